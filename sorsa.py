"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation.

Reference implementation of arXiv:2409.00055 that needs only torch (>= 2.9); MIT License (LICENSE): copy it.

The method in ten lines (PyTorch convention: a weight W_0 is (m, n) = (out, in)):

    W_0 = U diag(S) V^T                                   SVD of the pretrained weight
    U_p, S_p, Vt_p = U[:, :r], S[:r], V^T[:r, :]          trainable principal factors   (Eq. 1)
    W_r = W_0 - U_p diag(S_p) Vt_p                        frozen residual                (Eq. 2)
    SORSA(x) = x W_r^T + x (U_p diag(S_p) Vt_p)^T         equals x W_0^T at step 0       (Eq. 3)
    L_reg = ||U_p^T U_p - I||_F + ||Vt_p Vt_p^T - I||_F   orthonormal regularizer        (Eq. 4)
            averaged over the 2 L factor matrices of L layers, as the authors' code does
    loss  = L_train + (gamma / lr_max) L_reg              one optimizer, one scheduler   (Eq. 6)
    merge: nn.Linear(weight = W_r + U_p diag(S_p) Vt_p)   no inference latency

PiSSA: the same split, U_p diag(S_p)^(1/2) and diag(S_p)^(1/2) Vt_p trained, no regularizer. This file follows
the paper; sorsa_integrations.py adds Hugging Face, PEFT, checksummed files and FSDP2. Precision: what trains is
stored in float32, what is frozen keeps the weight's dtype, the forward runs in the activations' dtype, and the
SVD, residual, regularizer and merge in IEEE float32 or wider.
"""

import contextlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_KEYS = ("U_p", "S_p", "Vt_p", "U_p0", "S_p0", "Vt_p0")  # per layer, in an adapter state
BASE_TOLERANCE = 0.05  # load_adapter's base check: the right base in bf16 gives ~1e-3, another ~1

# ---------------------------------------------------------------------------------- precision and checks
def _wide_dtype(*dtypes):
    """float64 if any of the dtypes is float64, else float32: the dtype of exact computations."""
    return torch.float64 if torch.float64 in dtypes else torch.float32

@contextlib.contextmanager
def _ieee_matmuls():
    """IEEE float32 matmuls inside, whatever the caller allows (TF32 on CUDA, bf16 passes in oneDNN on AMX)."""
    saved = [(b, b.fp32_precision) for b in (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)]
    try:
        for b, _ in saved:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in saved:
            b.fp32_precision = value

def _check_rank(rank, m=None, n=None, where=""):
    """Raise unless rank is an int, in [1, min(m, n)] if given; `where` names the layer."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    if m is not None and not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is outside [1, min(out, in)] = [1, {min(m, n)}]{where}; choose one in it")

def _check_split_arguments(niter, factor_dtype):
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be None (exact SVD) or an int >= 0, got {niter!r}")
    if not (factor_dtype is None or isinstance(factor_dtype, torch.dtype) and factor_dtype.is_floating_point):
        raise TypeError(f"factor_dtype must be None or a floating torch.dtype, got {factor_dtype!r}")

def _check_weight(weight, where=""):
    """Raise unless weight is a 2-D floating tensor of finite values (on the meta device: shapes only)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight{where} must be a 2-D tensor (out, in), got {getattr(weight, 'shape', weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight{where} has dtype {weight.dtype}; SORSA needs a floating weight: dequantize it")
    if not weight.is_meta and not torch.isfinite(weight).all():
        raise ValueError(f"weight{where} contains NaN or Inf; the SVD of it is undefined")

# ---------------------------------------------------------------------------------- SVD split (Eqs. 1-2)
def _add_W_p(W, U_p, S_p, Vt_p, alpha):
    """W + alpha U_p diag(S_p) Vt_p (m, n), computed wide and cast once: alpha -1 gives W_r (Eq. 2), +1 the merge."""
    wide = _wide_dtype(W.dtype, U_p.dtype)
    out = W.detach().to(wide, memory_format=torch.contiguous_format, copy=True)  # (m, n)
    with torch.no_grad(), _ieee_matmuls():
        out.addmm_(U_p.to(wide) * S_p.to(wide), Vt_p.to(wide), alpha=alpha)  # S_p scales columns
    return out.to(W.dtype)

def _orthonormalized(factor):
    """factor (k, r) with orthonormal columns to its dtype's rounding (a float32 SVD's are to ~100 roundings)."""
    Q, R = torch.linalg.qr(factor.double())  # (k, r), (r, r) with a diagonal of ~+-1
    return (Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).to(factor.dtype)  # each column kept itself

def _sketch(W, rank, niter):
    """Omega (n, l) of W (m, n)'s randomized SVD, l = r + max(r, 10), seeded, in W's wide dtype; None: the exact SVD."""
    l = rank + max(rank, 10)  # oversampled for accurate top singular values; seeded: one weight always gives one split
    g = None if niter is None or l >= min(W.shape) or W.is_meta else torch.Generator(device=W.device).manual_seed(0)
    return None if g is None else torch.randn(W.shape[1], l, generator=g, device=W.device, dtype=_wide_dtype(W.dtype))

def _factors(weight, rank, niter, factor_dtype):
    """U_p (m, r), S_p (r,), Vt_p (r, n) of W (Eq. 1), by an exact or randomized SVD in float32 or wider (a bf16 SVD
    fails), orthonormalized, in factor_dtype (default: float32, or float64 for a float64 W)."""
    W = weight.detach().to(_wide_dtype(weight.dtype))  # (m, n)
    with torch.no_grad(), _ieee_matmuls():  # the sketch's products too in IEEE float32
        if (Omega := _sketch(W, rank, niter)) is None:  # else Omega (n, l)
            U, S, Vt = torch.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
        else:
            Q = torch.linalg.qr(W @ Omega).Q  # (m, l)
            for _ in range(niter):  # each sharpens a decaying spectrum; QR keeps the basis conditioned
                Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q  # (m, l)
            U_small, S, Vt = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (l, l), (l,), (l, n)
            U = Q @ U_small  # (m, l)
        return tuple(t.to(factor_dtype or W.dtype, memory_format=torch.contiguous_format, copy=True)
                     for t in (_orthonormalized(U[:, :rank]), S[:rank], _orthonormalized(Vt[:rank].mT).mT))

def svd_split(weight, rank, niter=None, factor_dtype=None):
    """Split W_0 (m, n) into U_p (m, r), S_p (r,), Vt_p (r, n), W_r (m, n) (Eqs. 1-2); niter: randomized SVD. Factors
    in factor_dtype (default float32, or float64), W_r in W_0's dtype: W_r + W_p = W_0 to a rounding."""
    _check_weight(weight)
    _check_rank(rank, *weight.shape)
    _check_split_arguments(niter, factor_dtype)
    U_p, S_p, Vt_p = _factors(weight, rank, niter, factor_dtype)
    return U_p, S_p, Vt_p, _add_W_p(weight, U_p, S_p, Vt_p, alpha=-1)

# ---------------------------------------------------------------------------------- the layer (Eq. 3)
def _whole(tensor):
    """The whole tensor: an FSDP2 shard (a DTensor) gathered from every rank; a tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

def _base_weight(layer):
    """W_0 (out, in) of an nn.Linear, or of a Conv1D-style layer (GPT-2's: weight (in, out) = W_0^T); else None."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    weight = getattr(layer, "weight", None)
    conv1d = type(layer).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
    return weight.mT if conv1d and weight.shape[1] == layer.nf else None

class SORSALinear(nn.Module):
    """y = x W_r^T + ((x Vt_p^T) * S_p) U_p^T + b (Eq. 3), (..., n) -> (..., m). Trainable: U_p (m, r), S_p (r,),
    Vt_p (r, n). Frozen: W_r (m, n), bias, the initial U_p0, S_p0, Vt_p0, and base_type, which merge() gives."""
    def __init__(self, U_p, S_p, Vt_p, W_r, bias=None, base_type=nn.Linear):
        super().__init__()
        (m, r), n = U_p.shape, W_r.shape[1]
        if S_p.shape != (r,) or Vt_p.shape != (r, n) or W_r.shape != (m, n):
            raise ValueError(f"inconsistent SORSA shapes {[tuple(t.shape) for t in (U_p, S_p, Vt_p, W_r)]} of "
                             "U_p, S_p, Vt_p, W_r: they must be (m, r), (r,), (r, n), (m, n)")
        self.in_features, self.out_features, self.rank, self.base_type = n, m, r, base_type
        self.U_p, self.S_p, self.Vt_p = (nn.Parameter(t.detach().clone()) for t in (U_p, S_p, Vt_p))
        self.W_r = nn.Parameter(W_r.detach(), requires_grad=False)  # (m, n), not copied: as large as W_0
        self.U_p0, self.S_p0, self.Vt_p0 = (nn.Parameter(t.detach().clone(), requires_grad=False)
                                            for t in (U_p, S_p, Vt_p))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, rank, niter=None, factor_dtype=None):
        """A ready SORSA layer whose output equals `linear`'s (Eq. 3 at t = 0)."""
        if _base_weight(linear) is None:
            raise TypeError(f"from_linear needs an nn.Linear or a Conv1D-style layer, got {type(linear).__name__}")
        return cls(*svd_split(_base_weight(linear), rank, niter, factor_dtype), linear.bias, type(linear))

    @property
    def weight(self):
        """W_r in the replaced layout, for code reading a layer's weight dtype (T5's); merge() gives the effective."""
        return self.W_r if issubclass(self.base_type, nn.Linear) else self.W_r.mT

    def forward(self, x):
        # Factored: r (m + n) multiply-adds per token, like LoRA; the (m, n) W_p is never formed.
        # The float32 factors are cast to the activations' dtype; their gradients stay float32.
        low = F.linear(x, self.Vt_p.to(x.dtype))  # (..., r)
        low = low * self.S_p.to(low.dtype)  # diag(S_p) as an elementwise scale
        return F.linear(x, self.W_r, self.bias) + F.linear(low, self.U_p.to(low.dtype))  # (..., m)

    def merge(self):
        """A frozen layer of the replaced type (or nn.Linear) with weight W_r + U_p diag(S_p) Vt_p: no latency."""
        W = _add_W_p(*(_whole(t) for t in (self.W_r, self.U_p, self.S_p, self.Vt_p)), alpha=+1)  # (m, n)
        with torch.device("meta"):  # shapes only: the weights are assigned below
            if issubclass(self.base_type, nn.Linear):  # a subclass with a constructor of its own: nn.Linear
                cls = self.base_type if self.base_type.__init__ is nn.Linear.__init__ else nn.Linear
                layer = cls(self.in_features, self.out_features, bias=self.bias is not None)
            else:
                layer, W = self.base_type(self.out_features, self.in_features), W.mT.contiguous()  # Conv1D(nf, nx)
        layer.weight = nn.Parameter(W, requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(_whole(self.bias).detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self):
        layout = "" if self.base_type is nn.Linear else f", replacing {self.base_type.__name__}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{layout}"

# ---------------------------------------------------------------------------------- regularizer (Eq. 4), update (Eq. 6)
def unwrap(model):
    """The model inside DistributedDataParallel or torch.compile's OptimizedModule (FSDP2 shards in place)."""
    ddp = isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel))
    inner = model.module if ddp else getattr(model, "_orig_mod", None)
    return unwrap(inner) if isinstance(inner, nn.Module) else model

def sorsa_modules(model, argument="model"):
    """(name, SORSALinear) pairs of a model (wrappers seen through), or of a list of SORSA layers."""
    if isinstance(model, (list, tuple)) and all(isinstance(layer, SORSALinear) for layer in model):
        model = nn.ModuleList(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be an nn.Module or a list of SORSALinear layers, got {type(model).__name__}")
    return [(name, mod) for name, mod in unwrap(model).named_modules() if isinstance(mod, SORSALinear)]

def _require_adapters(model, argument="model", finite_for=None):
    """sorsa_modules(model), refusing none; with finite_for (what a NaN would spoil), refusing non-finite ones."""
    found = sorsa_modules(model, argument)
    if not found:
        raise ValueError("the model has no SORSA adapters; call apply_sorsa(model, rank) first")
    bad = [f"layer {name}: {key}" for name, mod in (found if finite_for else ()) for key in ("U_p", "S_p", "Vt_p")
           if not _whole(getattr(mod, key)).isfinite().all()]
    if bad:
        raise ValueError(f"{bad[0]} contains NaN or Inf (training diverged); {finite_for}. "
                         "Restart from the last good adapter with a lower learning rate")
    return found

class _Gram(torch.autograd.Function):
    """G = F^T F (L, r, r) of factors F (L, k, r), and F (dG + dG^T) back, both in IEEE float32 or wider (left to
    autograd, the backward would run at whatever precision the caller set then: TF32, AMX's bf16)."""
    @staticmethod
    def forward(ctx, factors):
        ctx.save_for_backward(factors)
        with torch.autocast(factors.device.type, enabled=False), _ieee_matmuls():
            return factors.mT @ factors  # (L, r, r)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (factors,) = ctx.saved_tensors
        with torch.autocast(factors.device.type, enabled=False), _ieee_matmuls():
            g = factors @ (grad + grad.mT)  # (L, k, r)
        return g.redistribute(factors.device_mesh, factors.placements) if hasattr(g, "placements") else g

def orthonormal_regularizer(model_or_modules, squared=False, reduction="mean"):
    """L_reg: Eq. 4 added up over the layers ("sum", as Eqs. 5-6 apply it), or its "mean" over the 2 L factors as the
    authors' code does (their gamma is on it: docs/gamma.md). squared: squared norms, whose gradient vanishes at I."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (the authors' code) or 'sum' (over layers), got {reduction!r}")
    found = _require_adapters(model_or_modules, "model_or_modules")
    stacks = {}  # written per layer, computed per shape: every U_p (m, r) and Vt_p^T (n, r)
    for _, mod in found:
        for factor in (mod.U_p, mod.Vt_p.mT):  # FSDP2: stacked with their like placements
            key = (factor.shape, factor.dtype, factor.device, getattr(factor, "placements", None))
            stacks.setdefault(key, []).append(factor)
    terms = []
    for factors in stacks.values():  # FSDP2: rows sharded give each rank part of the Gram, _whole sums them
        gram = _whole(_Gram.apply(torch.stack(factors).to(_wide_dtype(factors[0].dtype))))  # (L, r, r)
        norms = torch.linalg.matrix_norm(gram - torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device))
        terms.append((norms.square() if squared else norms).sum())
    total = sum(t.to(terms[0].device) for t in terms)
    return total / (2 * len(found)) if reduction == "mean" else total

def _check_gamma(model, gamma, lr_max):
    sorsa_modules(model)  # the model's type first
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (gamma, lr_max)):
        raise TypeError(f"gamma and lr_max must be numbers, got {gamma!r} and {lr_max!r}")
    if not (gamma >= 0 and lr_max > 0):
        raise ValueError(f"gamma must be >= 0 and lr_max the peak learning rate (> 0), got {gamma}, {lr_max}")

def sorsa_loss(train_loss, model, gamma, lr_max, squared=False, reduction="mean"):
    """L_train + (gamma / lr_max) L_reg: a step of size eta_t is Eq. 5 with gamma_t = gamma eta_t / lr_max, Eq. 6 (exact
    for SGD). A clip after it clips both terms; the authors clip the task's alone, as add_regularizer_grad does."""
    if not isinstance(train_loss, torch.Tensor) or train_loss.numel() != 1:
        raise TypeError(f"train_loss must be the task loss as a one-element tensor, got {type(train_loss).__name__}; "
                        "the order is sorsa_loss(train_loss, model, gamma, lr_max)")
    _check_gamma(model, gamma, lr_max)
    return train_loss + (gamma / lr_max) * orthonormal_regularizer(model, squared, reduction) if gamma else train_loss

def add_regularizer_grad(model, gamma, lr_max, squared=False, reduction="mean"):
    """Add grad (gamma / lr_max) L_reg (Eq. 6) to the factors' .grad between the clip and optimizer.step(), once a
    step, as the authors do; return L_reg. Their runs had gamma 6.25e-6 at lr_max 3e-5 (docs/gamma.md)."""
    _check_gamma(model, gamma, lr_max)
    reg = orthonormal_regularizer(model, squared, reduction)
    if gamma > 0:
        ((gamma / lr_max) * reg).backward()
    return reg.detach()

def cosine_schedule(optimizer, total_steps, warmup_ratio=0.03):
    """App. B: linear warm-up over 3% of the steps, cosine decay to 0; its peak, the optimizer's lr, is lr_max."""
    warmup = max(1, round(warmup_ratio * total_steps))
    def multiplier(step):  # of the optimizer's lr at `step`
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))
        return (step + 1) / warmup if step < warmup else cosine
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

# ---------------------------------------------------------------------------------- a model: apply and merge
def _model_to_convert(model, verb):
    """The model to convert, seen through torch.compile: not yet adapted, not yet DDP-wrapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb} needs an nn.Module as its model, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"{verb} changes layers {type(model).__name__} registered: call {verb} on the plain model "
                        "first, then wrap it")
    if sorsa_modules(model):
        raise ValueError("the model already has SORSA adapters: merge_sorsa(model) first, or start from the base")
    return unwrap(model)

def _matches(name, target):
    """A module name matches a pattern if it is the pattern or ends with '.' + pattern."""
    return name == target or name.endswith("." + target)

def _target_patterns(target_modules, argument="target_modules"):
    """None (every linear layer: None or "all-linear"), or a non-empty tuple of name patterns."""
    if target_modules is None or target_modules == "all-linear" and argument == "target_modules":
        return None
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"{argument} must be None, a name or a list of names, got {target_modules!r}")
    return targets

def _select_targets(model, rank, targets, unfit=None, skip=()):
    """The layers to adapt, all checked: those matching `targets`, or else every linear layer but the output head,
    tied weights and what unfit(name, layer) objects to, named in a warning (`skip`: silently)."""
    for target in targets or ():
        if not any(_matches(name, target) for name, _ in model.named_modules()):
            raise ValueError(f"target {target!r} matches no layer of the model; nothing was changed")
    names_of = {}  # id(parameter) -> all its names: tied weights share one
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(pname)
    head = getattr(model, "get_output_embeddings", lambda: None)()
    unfit = unfit or (lambda name, mod: f"{type(mod).__name__}, an nn.Linear subclass (sorsa_integrations "
                      "probes those)" if isinstance(mod, nn.Linear) and type(mod) is not nn.Linear else None)
    selected, skipped = [], []
    for name, mod in model.named_modules():
        if not name or name in skip or (not any(_matches(name, t) for t in targets) if targets
                                        else _base_weight(mod) is None):
            continue
        tied = [o for o in names_of.get(id(getattr(mod, "weight", None)), []) if o != f"{name}.weight"]
        wrong_type = (f"{type(mod).__name__}, not nn.Linear or a Conv1D-style layer" if _base_weight(mod) is None
                      else unfit(name, mod))
        problem = wrong_type or ("the output head" if not targets and (mod is head or name.endswith("lm_head"))
                                 else f"tied to {', '.join(tied)}" if tied else None)
        if problem and targets:
            raise (TypeError if wrong_type else ValueError)(
                f"{name} matches the targets but is {problem}; exclude it from target_modules")
        if problem:
            skipped.append(f"{name} ({problem})")
            continue
        _check_weight(_base_weight(mod), f" for layer {name}")
        _check_rank(rank, *_base_weight(mod).shape, f" for layer {name}")
        selected.append(name)
    if not selected:
        raise ValueError(f"the model has no nn.Linear or Conv1D-style layer to adapt; skipped: {'; '.join(skipped)}")
    if skipped:
        warnings.warn(f"apply_sorsa adapted every linear layer but {'; '.join(skipped)}", stacklevel=3)
    return selected

def _convert(model, names, build):
    """Set each layer to build(name), one at a time (a failure leaves each whole), then freeze all but factors."""
    done = []
    try:
        for name in names:
            model.set_submodule(name, build(name))
            done.append(name)
    except BaseException as err:
        err.add_note(f"SORSA: {len(done)} of {len(names)} layers were converted before this error: "
                     f"{', '.join(done) or 'none'}, each whole; merge_sorsa(model) turns them back")
        raise
    model.requires_grad_(False)
    for _, mod in sorsa_modules(model):
        for p in (mod.U_p, mod.S_p, mod.Vt_p):
            p.requires_grad_(True)
    return list(names)

def apply_sorsa(model, rank, target_modules=None, niter=None, factor_dtype=None):
    """Replace linear layers by SORSA layers in place, freeze the rest; return their names. target_modules: names
    (["q_proj", "v_proj"], matching name ends), or None: every nn.Linear and Conv1D-style layer but the output
    head (lm_head, get_output_embeddings()) and tied weights. Everything is checked before a layer changes."""
    model = _model_to_convert(model, "apply_sorsa")
    _check_rank(rank)
    _check_split_arguments(niter, factor_dtype)
    names = _select_targets(model, rank, _target_patterns(target_modules))
    return _convert(model, names, lambda n: SORSALinear.from_linear(model.get_submodule(n), rank, niter, factor_dtype))

def merge_sorsa(model):
    """Replace every SORSA layer in place by its merge(), a layer of the type it replaced; return their names."""
    found = _require_adapters(model, finite_for="merge_sorsa merged nothing")
    for name, mod in found:  # one layer at a time: one extra layer's weight at most
        unwrap(model).set_submodule(name, mod.merge())
    return [name for name, _ in found]

# ---------------------------------------------------------------------------------- adapters
def adapter_state_dict(model):
    """'{layer}.U_p', ..., '{layer}.Vt_p0': the trained and the initial factors, CPU copies (FSDP2: call it on every
    rank), which put W_p,t - W_p,0 onto the original base without W_r or an SVD. Save it with torch.save."""
    found = _require_adapters(model, finite_for="no adapter state was made")
    return {f"{name}.{key}": _whole(getattr(mod, key)).detach().to("cpu", copy=True)
            for name, mod in found for key in ADAPTER_KEYS}

def _adapter_layers(model, state, source, check_base):
    """{layer: {key: tensor}} of an adapter state, checked against the model (with check_base, its weights too)."""
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source}: an adapter state must be a non-empty dict from adapter_state_dict()")
    layers, modules = {}, dict(model.named_modules())
    for key, tensor in state.items():
        name, _, part = str(key).rpartition(".")
        layers.setdefault(name, {})[part] = tensor
    for name, parts in layers.items():
        W_0, S_p = _base_weight(modules.get(name)), parts.get("S_p")
        m, n = W_0.shape if W_0 is not None else (0, 0)
        r = S_p.shape[0] if torch.is_tensor(S_p) and S_p.dim() == 1 else 0
        needs = {k: {"U_p": (m, r), "S_p": (r,), "Vt_p": (r, n)}[k.removesuffix("0")] for k in ADAPTER_KEYS}
        has = {k: tuple(getattr(v, "shape", ())) for k, v in parts.items()}
        bad = [k for k, v in parts.items() if not (torch.is_tensor(v) and v.is_floating_point() and v.isfinite().all())]
        if W_0 is None or has != needs or not 1 <= r <= min(m, n) or bad:
            why = ("is absent" if name not in modules else f"is {type(modules[name]).__name__}, not nn.Linear or "
                   "Conv1D-style" if W_0 is None else f"is {m}x{n} (out x in), which at rank {r} needs {needs}")
            got = f"{has} ({', '.join(bad)} not finite floats)" if bad else has
            raise ValueError(f"{source}: layer {name!r} has {got}, but the layer {why}; is it the right base model? "
                             "Nothing was changed")
        if check_base and not W_0.is_meta:  # the initial factors are W_0's top-r triplets: U_p0^T W_0 V_p0 = S_p0
            wide = _wide_dtype(W_0.dtype, parts["U_p0"].dtype)
            U0, S0, Vt0 = (parts[k].to(W_0.device, wide) for k in ("U_p0", "S_p0", "Vt_p0"))
            with torch.no_grad(), _ieee_matmuls():
                error = torch.linalg.matrix_norm(U0.mT @ W_0.to(wide) @ Vt0.mT - torch.diag(S0)) / S0.norm()
            if not error <= BASE_TOLERANCE:  # ~0 for the right base (bf16: ~1e-3), ~1 for another
                raise ValueError(f"{source}: layer {name} does not hold the weight the adapter was made from: ||U_p0^T "
                                 f"W_0 V_p0 - diag(S_p0)||_F / ||S_p0|| = {error:.3g}, above {BASE_TOLERANCE}. The "
                                 "right base? Nothing was changed; check_base=False loads it all the same")
    return layers

def load_adapter(model, state, factor_dtype=None, check_base=True, source="the adapter state"):
    """Put an adapter_state_dict (torch.load a file) onto the original base, each layer W_0 as SORSA with W_r = W_0 -
    W_p,0 and the trained factors: no SVD. check_base refuses another base; all is checked before a change."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be an adapter dict (a file: torch.load it first), got {type(state).__name__}")
    model = _model_to_convert(model, "load_adapter")
    _check_split_arguments(None, factor_dtype)
    layers = _adapter_layers(model, state, source, check_base)
    def build(name):  # one layer at a time, as _convert asks
        base = model.get_submodule(name)
        W_0 = _base_weight(base)
        p = {k: v.to(W_0.device, factor_dtype or _wide_dtype(W_0.dtype)) for k, v in layers[name].items()}
        W_r = _add_W_p(W_0, p["U_p0"], p["S_p0"], p["Vt_p0"], alpha=-1)  # Eq. 2 with the saved initial factors
        layer = SORSALinear(p["U_p0"], p["S_p0"], p["Vt_p0"], W_r, base.bias, type(base))
        layer.load_state_dict({key: p[key] for key in ("U_p", "S_p", "Vt_p")}, strict=False)  # the trained ones
        return layer
    return _convert(model, list(layers), build)

# ---------------------------------------------------------------------------------- analysis (Section 4)
def _svd64(W_0, W_t):
    """SVDs of two same-shape weights in float64 on the CPU, as the paper advises (App. B.1)."""
    if not all(torch.is_tensor(W) and W.dim() == 2 for W in (W_0, W_t)) or W_0.shape != W_t.shape:
        raise ValueError(f"delta_sigma/delta_d need two 2-D weights of one shape, got {getattr(W_0, 'shape', W_0)} "
                         f"and {getattr(W_t, 'shape', W_t)}")
    return [torch.linalg.svd(W.detach().to("cpu", torch.float64), full_matrices=False) for W in (W_0, W_t)]

def delta_sigma(W_0, W_t):
    """Eq. 7: mean absolute change of the k = min(m, n) singular values: (m, n), (m, n) -> float."""
    (_, S_0, _), (_, S_t, _) = _svd64(W_0, W_t)
    return (S_t - S_0).abs().mean().item()

def delta_d(W_0, W_t):
    """Eqs. 8-10: 1 - mean |cosine| of singular vectors matched by rank order (|.|: the SVD's sign): -> [0, 1]."""
    (U_0, _, Vt_0), (U_t, _, Vt_t) = _svd64(W_0, W_t)
    dU = (U_t * U_0).sum(dim=0).abs()  # (k,) Eq. 8: |<u_t^i, u_0^i>|
    dV = (Vt_t * Vt_0).sum(dim=1).abs()  # (k,) Eq. 9: |<v_t^i, v_0^i>|
    return 1.0 - (dU.sum() + dV.sum()).item() / (2 * dU.numel())  # Eq. 10
