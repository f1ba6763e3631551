"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation.

A reference implementation of arXiv:2409.00055 that needs Python 3.11+ and only torch (2.9+); MIT
License: copy it. The method in ten lines, for a weight W_0 (m, n) = (out, in), as PyTorch has it:

    W_0 = U diag(S) V^T                                  SVD of the pretrained weight
    U_p, S_p, Vt_p = U[:, :r], S[:r], V^T[:r, :]         trainable principal factors  (Eq. 1)
    W_r = W_0 - U_p diag(S_p) Vt_p                       frozen residual              (Eq. 2)
    SORSA(x) = x W_r^T + x (U_p diag(S_p) Vt_p)^T        equals x W_0^T at step 0     (Eq. 3)
    L_reg = ||U_p^T U_p - I||_F + ||Vt_p Vt_p^T - I||_F  orthonormal regularizer      (Eq. 4)
            averaged over the 2 L factor matrices of L layers, as the authors' code does
    loss  = L_train + (gamma / lr_max) L_reg             one optimizer, one schedule  (Eq. 6)
    merge: nn.Linear(weight = W_r + U_p diag(S_p) Vt_p)  no inference latency

PiSSA is the same split with diag(S_p)^(1/2) folded into both factors and no regularizer.
In the paper's order: the split, the layer, the regularizer, a model's verbs (apply, merge),
adapters, the analysis metrics. Precision: what trains is stored in float32, what is frozen
keeps the weight's dtype, the forward runs in the activations' dtype, and the SVD, residual,
regularizer and merge run in IEEE float32 or wider. sorsa_integrations.py adds what Hugging
Face models, PEFT files, checksummed saves and FSDP2 need.
"""

import contextlib
import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# ------------------------------------------------------------------ precision, and input checks
def _wide_dtype(*dtypes):
    """The dtype of exact computations: float64 if any of the dtypes is, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32

@contextlib.contextmanager
def _ieee_float32():
    """IEEE float32 matmuls inside, whatever the caller allows (TF32 on CUDA, AMX's bf16 passes)."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    try:
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value

def _check_args(rank=1, niter=None, factor_dtype=None):
    """Raise unless rank is an int, niter None or an int >= 0, factor_dtype None or floating."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be None (exact SVD) or an int >= 0, got {niter!r}")
    if factor_dtype is not None and not getattr(factor_dtype, "is_floating_point", False):
        raise TypeError(f"factor_dtype must be None or a floating dtype, got {factor_dtype!r}")

def _check_weight(W, rank, where=""):
    """Raise unless W is a finite 2-D float tensor (m, n) with rank in [1, min(m, n)]."""
    if not isinstance(W, torch.Tensor) or W.dim() != 2:
        raise ValueError(f"weight{where} must be a 2-D tensor (out, in), got {W!r:.60}")
    if not W.is_floating_point():
        raise TypeError(f"weight{where} has dtype {W.dtype}; SORSA needs a float: dequantize it")
    if not torch.isfinite(W).all():
        raise ValueError(f"weight{where} contains NaN or Inf; the SVD of it is undefined")
    if not 1 <= rank <= min(W.shape):
        raise ValueError(f"rank {rank} is outside [1, min(out, in)] = [1, {min(W.shape)}]{where}")

# ------------------------------------------------------------------ the SVD split (Eqs. 1-2)
def _sketch(W, rank):
    """Omega (n, l), l = r + max(r, 10), seeded (one weight, one split); None if l >= min(m, n)."""
    l = rank + max(rank, 10)  # oversampled: the top r singular values come out accurate
    if l >= min(W.shape):
        return None  # the exact SVD costs no more
    seeded = torch.Generator(device=W.device).manual_seed(0)
    return torch.randn(W.shape[1], l, generator=seeded, device=W.device, dtype=_wide_dtype(W.dtype))

def _randomized_svd(W, rank, niter):
    """U (m, l), S (l,), Vt (l, n): W's top l triplets (Halko et al. 2011), or its whole SVD."""
    Omega = _sketch(W, rank)  # (n, l)
    if Omega is None:
        return torch.linalg.svd(W, full_matrices=False)
    Q = torch.linalg.qr(W @ Omega).Q  # (m, l): an orthonormal basis of W's top directions
    for _ in range(niter):  # each pass sharpens a decaying spectrum; QR keeps the basis conditioned
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q  # (m, l)
    U_small, S, Vt = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (l, l), (l,), (l, n)
    return Q @ U_small, S, Vt

def _orthonormalized(factor):
    """factor (k, r) with columns orthonormal to its rounding (a float32 SVD's: ~100 roundings)."""
    Q, R = torch.linalg.qr(factor.double())  # (k, r), (r, r) with a diagonal of about +-1
    return (Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).to(factor.dtype)  # signs kept

def _top_triplets(W, rank, niter):
    """U_p (m, r), S_p (r,), Vt_p (r, n) of W (m, n), in W's dtype (float32 or wider): Eq. 1."""
    with torch.no_grad(), _ieee_float32():
        if niter is None:
            U, S, Vt = torch.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
        else:
            U, S, Vt = _randomized_svd(W, rank, niter)  # (m, l), (l,), (l, n)
        U_p, S_p, Vt_p = U[:, :rank], S[:rank], Vt[:rank]  # Eq. 1: the top r singular triplets
        U_p, Vt_p = _orthonormalized(U_p), _orthonormalized(Vt_p.mT).mT
        return U_p.contiguous(), S_p.contiguous(), Vt_p.contiguous()  # rows in memory, as trained

def svd_split(W_0, rank, niter=None, factor_dtype=None):
    """U_p (m, r), S_p (r,), Vt_p (r, n), W_r (m, n) of W_0 (m, n) (Eqs. 1-2); niter: a randomized
    SVD. Factors in factor_dtype (default float32, or float64 for a float64 W_0), W_r in W_0's."""
    _check_args(rank, niter, factor_dtype)
    _check_weight(W_0, rank)
    dtype, wide = W_0.dtype, _wide_dtype(W_0.dtype, factor_dtype)
    W_r = W_0.detach().to(wide, memory_format=torch.contiguous_format, copy=True)  # (m, n): W_0
    # in the wide dtype (an SVD in bf16 fails), which becomes W_r below
    U_p, S_p, Vt_p = (t.to(factor_dtype or wide) for t in _top_triplets(W_r, rank, niter))
    with torch.no_grad(), _ieee_float32():
        # Eq. 2, W_r = W_0 - U_p diag(S_p) Vt_p, subtracted in place: no second (m, n) buffer. A
        # difference, not the paper's U[:, r:] S[r:] V^T[r:]: then W_r + W_p is W_0 to a rounding
        # with the very factors stored, and a randomized SVD has no U[:, r:]
        W_r.addmm_(U_p.to(wide) @ torch.diag(S_p.to(wide)), Vt_p.to(wide), alpha=-1)
    return U_p, S_p, Vt_p, W_r.to(dtype)

# ------------------------------------------------------------------ the layer (Eq. 3)
def _whole(tensor):
    """The whole tensor: an FSDP2 shard (a DTensor) gathered from every rank; a tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor

def _base_weight(layer):
    """W_0 (out, in) of an nn.Linear or a Conv1D-style layer (GPT-2's: W_0^T), or None."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    W = getattr(layer, "weight", None)
    conv1d = type(layer).__name__ == "Conv1D" and isinstance(W, torch.Tensor) and W.dim() == 2
    return W.mT if conv1d and W.shape[1] == layer.nf else None

class SORSALinear(nn.Module):
    """y = x W_r^T + ((x Vt_p^T) * S_p) U_p^T + b (Eq. 3): (..., n) -> (..., m). Trained: U_p
    (m, r), S_p (r,), Vt_p (r, n). Frozen: W_r (m, n), the bias, the initial U_p0, S_p0, Vt_p0."""

    def __init__(self, U_p, S_p, Vt_p, W_r, bias=None, base_type=nn.Linear):
        super().__init__()
        (m, r), n = U_p.shape, W_r.shape[1]
        if S_p.shape != (r,) or Vt_p.shape != (r, n) or W_r.shape != (m, n):
            shapes = [tuple(t.shape) for t in (U_p, S_p, Vt_p, W_r)]
            raise ValueError(f"inconsistent SORSA shapes {shapes} of U_p, S_p, Vt_p, W_r: they "
                             "must be (m, r), (r,), (r, n), (m, n)")
        self.in_features, self.out_features, self.rank = n, m, r
        self.base_type = base_type  # the type of the layer replaced, which merge() gives back
        self.U_p, self.S_p, self.Vt_p = (nn.Parameter(t.detach().clone()) for t in (U_p, S_p, Vt_p))
        self.W_r = nn.Parameter(W_r.detach(), requires_grad=False)  # not copied: as large as W_0
        self.U_p0, self.S_p0, self.Vt_p0 = (nn.Parameter(t.detach().clone(), requires_grad=False)
                                            for t in (U_p, S_p, Vt_p))
        self.bias = None
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, rank, niter=None, factor_dtype=None):
        """A ready SORSA layer that computes what `linear` did (Eq. 3 at step 0)."""
        W_0 = _base_weight(linear)  # (m, n)
        if W_0 is None:
            raise TypeError(f"from_linear needs an nn.Linear or a Conv1D, got {type(linear)}")
        return cls(*svd_split(W_0, rank, niter, factor_dtype), linear.bias, type(linear))

    @property
    def weight(self):
        """W_r in the replaced layer's layout, for code that reads a weight's dtype (T5 does)."""
        return self.W_r if issubclass(self.base_type, nn.Linear) else self.W_r.mT

    def forward(self, x):  # Eq. 3, factored: r (m + n) multiply-adds a token, as LoRA. App. A's
        # Eq. 15 forms U_p diag(S_p) Vt_p (m, n) on every call; this never does. The float32
        # factors are cast to the activations' dtype; their gradients stay float32.
        h = F.linear(x, self.Vt_p.to(x.dtype))  # (..., r)
        h = h * self.S_p.to(h.dtype)  # diag(S_p), as an elementwise scale
        return F.linear(x, self.W_r, self.bias) + F.linear(h, self.U_p.to(h.dtype))  # (..., m)

    def merge(self):
        """A frozen layer of the replaced type with weight W_r + U_p diag(S_p) Vt_p: no latency."""
        W_r, U_p, S_p, Vt_p = (_whole(t).detach() for t in (self.W_r, self.U_p, self.S_p,
                                                             self.Vt_p))
        wide = _wide_dtype(W_r.dtype, U_p.dtype)
        with torch.no_grad(), _ieee_float32():
            U_S = U_p.to(wide) @ torch.diag(S_p.to(wide))  # (m, r)
            W = torch.addmm(W_r.to(wide), U_S, Vt_p.to(wide))  # W_r + U_p diag(S_p) Vt_p (m, n)
        W, kind, (m, n) = W.to(W_r.dtype), self.base_type, W_r.shape
        with torch.device("meta"):  # shapes only: the weights are set below
            if kind.__init__ is nn.Linear.__init__:  # nn.Linear, or a subclass with its signature
                layer = kind(n, m, bias=self.bias is not None)
            elif issubclass(kind, nn.Linear):
                layer = nn.Linear(n, m, bias=self.bias is not None)
            else:  # a Conv1D(nf, nx): weight (in, out)
                layer, W = kind(m, n), W.mT.contiguous()
        layer.weight = nn.Parameter(W, requires_grad=False)
        if self.bias is not None:
            layer.bias = nn.Parameter(_whole(self.bias).detach().clone(), requires_grad=False)
        return layer

    def extra_repr(self):
        layout = "" if self.base_type is nn.Linear else f", replacing {self.base_type.__name__}"
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"rank={self.rank}{layout}"

# ------------------------------------------------------------------ finding a model's SORSA layers
def unwrap(model):
    """The model inside DistributedDataParallel or torch.compile's wrapper (FSDP2: the model)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return unwrap(model.module)
    inner = getattr(model, "_orig_mod", None)  # torch.compile's
    return unwrap(inner) if isinstance(inner, nn.Module) else model

def sorsa_modules(model, argument="model"):
    """(name, SORSALinear) pairs of a model, or of a list of SORSA layers."""
    if isinstance(model, (list, tuple)) and all(isinstance(m, SORSALinear) for m in model):
        model = nn.ModuleList(model)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be an nn.Module or a list of SORSALinear layers, "
                        f"got {type(model).__name__}")
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, SORSALinear)]

def _adapted(model, argument="model", spoiled=None):
    """sorsa_modules(model), refusing none, and given `spoiled` (what a NaN spoils), NaN factors."""
    found = sorsa_modules(model, argument)
    if not found:
        raise ValueError("the model has no SORSA adapters; call apply_sorsa(model, rank) first")
    if spoiled is None:
        return found
    for name, layer in found:
        for key in ("U_p", "S_p", "Vt_p"):
            if not _whole(getattr(layer, key)).isfinite().all():
                raise ValueError(f"layer {name}: {key} contains NaN or Inf (training diverged); "
                                 f"{spoiled}. Restart from the last good adapter at a lower lr")
    return found

# ------------------------------------------------------------------ the regularizer (Eq. 4), Eq. 6
class _ExactGram(torch.autograd.Function):
    """F^T F (L, r, r) of stacked factors F (L, k, r), and its backward, in IEEE float32 or wider
    (left to autograd, the backward would run at the caller's precision: TF32, AMX's bf16)."""

    @staticmethod
    def forward(ctx, factors):
        ctx.save_for_backward(factors)
        with torch.autocast(factors.device.type, enabled=False), _ieee_float32():
            return factors.mT @ factors  # (L, r, r)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (factors,) = ctx.saved_tensors
        with torch.autocast(factors.device.type, enabled=False), _ieee_float32():
            grad = factors @ (grad + grad.mT)  # (L, k, r)
        if hasattr(grad, "placements"):  # FSDP2: each factor's gradient in its own placement,
            # which FSDP2's reduce-scatter adds to (a Vt_p held by rows would get a partial sum)
            grad = grad.redistribute(factors.device_mesh, factors.placements)
        return grad

def _stacked_by_shape(layers):
    """Every U_p (m, r) and Vt_p^T (n, r) of the layers, stacked by shape: [(L, k, r), ...]."""
    stacks = {}
    for layer in layers:
        for factor in (layer.U_p, layer.Vt_p.mT):  # FSDP2: stacked with their like placements
            key = (factor.shape, factor.dtype, factor.device, getattr(factor, "placements", None))
            stacks.setdefault(key, []).append(factor)
    return [torch.stack(factors) for factors in stacks.values()]

def orthonormal_regularizer(model_or_modules, squared=False, reduction="mean"):
    """L_reg: Eq. 4 of each layer, averaged over the 2 L factors ("mean", the authors' code, whose
    gamma is on it) or summed over the L layers ("sum", as Eqs. 5-6 have it); squared: norms^2."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (the authors') or 'sum', got {reduction!r}")
    layers = [layer for _, layer in _adapted(model_or_modules, "model_or_modules")]
    terms = []
    for factors in _stacked_by_shape(layers):  # written per layer, computed once per shape
        gram = _whole(_ExactGram.apply(factors.to(_wide_dtype(factors.dtype))))  # F^T F (L, r, r)
        eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
        norms = torch.linalg.matrix_norm(gram - eye)  # (L,) Eq. 4: ||F^T F - I||_F, F = U_p, Vt_p^T
        terms.append((norms.square() if squared else norms).sum())
    total = sum(t.to(terms[0].device) for t in terms)  # layers may sit on several devices
    return total / (2 * len(layers)) if reduction == "mean" else total

def _check_gamma(model, gamma, lr_max):
    """Raise unless model is a model (checked first), gamma a number >= 0 and lr_max one > 0."""
    sorsa_modules(model)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (gamma, lr_max)):
        raise TypeError(f"gamma and lr_max must be numbers, got {gamma!r} and {lr_max!r}")
    if not (gamma >= 0 and lr_max > 0):
        raise ValueError(f"gamma must be >= 0 and lr_max the peak lr (> 0), got {gamma}, {lr_max}")

def sorsa_loss(train_loss, model, gamma, lr_max, squared=False, reduction="mean"):
    """L_train + (gamma / lr_max) L_reg (Eq. 6; for SGD at eta_t, Eq. 5 with gamma_t = gamma eta_t /
    lr_max). A clip after it clips both terms; add_regularizer_grad leaves L_reg's alone."""
    if not isinstance(train_loss, torch.Tensor) or train_loss.numel() != 1:
        raise TypeError(f"train_loss must be the task loss as a one-element tensor, got "
                        f"{type(train_loss).__name__}; the order is sorsa_loss(train_loss, model, "
                        "gamma, lr_max)")
    _check_gamma(model, gamma, lr_max)
    if gamma == 0:
        return train_loss
    return train_loss + (gamma / lr_max) * orthonormal_regularizer(model, squared, reduction)

def add_regularizer_grad(model, gamma, lr_max, squared=False, reduction="mean"):
    """Add (gamma / lr_max) grad L_reg (Eq. 6) to the factors' .grad after the clip, once a step,
    as the authors do; return L_reg. Their runs had gamma 6.25e-6 at lr_max 3e-5 (docs/gamma.md)."""
    _check_gamma(model, gamma, lr_max)
    reg = orthonormal_regularizer(model, squared, reduction)
    if gamma > 0:
        ((gamma / lr_max) * reg).backward()
    return reg.detach()

def cosine_schedule(optimizer, total_steps, warmup_ratio=0.03):
    """App. B: a linear warm-up over 3% of the steps, then a cosine decay to 0 from lr_max."""
    warmup = max(1, round(warmup_ratio * total_steps))

    def multiplier(step):  # of lr_max, the optimizer's lr, at `step`
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)

# ------------------------------------------------------------------ a model: apply and merge
def _model_to_convert(model, verb):
    """The model to convert (seen through torch.compile): not yet adapted, not yet DDP-wrapped."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb} needs an nn.Module as its model, got {type(model).__name__}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"{verb} changes layers {type(model).__name__} registered: call {verb} on "
                        "the plain model first, then wrap it")
    if sorsa_modules(model):
        raise ValueError("the model already has SORSA adapters: merge_sorsa(model) first")
    return unwrap(model)

def _matches(name, target):
    """A module name matches a pattern if it is the pattern or ends with '.' + pattern."""
    return name == target or name.endswith("." + target)

def _target_patterns(target_modules, argument="target_modules"):
    """None (every linear layer: None or "all-linear"), or a non-empty tuple of name patterns."""
    if target_modules is None or target_modules == "all-linear":
        return None
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"{argument} must be None, a name or a list of names, got {targets!r}")
    return targets

def _skip_reason(model, targets):
    """why(name, layer): why a matched linear layer stays out (tied, or the head) or None."""
    names_of = {}  # id(parameter) -> all its names: tied weights share one
    for pname, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(pname)
    head = getattr(model, "get_output_embeddings", lambda: None)()

    def why(name, layer):
        tied = [other for other in names_of.get(id(layer.weight), []) if other != f"{name}.weight"]
        if targets and tied:
            raise ValueError(f"{name} matches the targets but is tied to {', '.join(tied)}")
        if not targets and (layer is head or name.endswith("lm_head")):
            return "the output head"
        return f"tied to {', '.join(tied)}" if tied else None
    return why

def _selected(selected, skipped):
    """The layers selected, refusing none; a warning names those skipped."""
    if not selected:
        raise ValueError("the model has no nn.Linear or Conv1D-style layer to adapt; skipped: "
                         f"{'; '.join(skipped)}")
    if skipped:
        warnings.warn(f"apply_sorsa adapted every linear layer but {'; '.join(skipped)}",
                      stacklevel=4)
    return selected

def _select_targets(model, rank, targets):
    """The layers to adapt, each checked: those matching targets; by default every nn.Linear and
    Conv1D-style layer but the output head, tied weights and subclasses, which a warning names."""
    named = dict(model.named_modules())
    for target in targets or ():
        if not any(_matches(name, target) for name in named):
            raise ValueError(f"target {target!r} matches no layer of the model; nothing changed")
    why_skipped, selected, skipped = _skip_reason(model, targets), [], []
    for name, layer in named.items():
        W_0 = _base_weight(layer)  # (m, n), or None
        matched = any(_matches(name, t) for t in targets) if targets else W_0 is not None
        if not name or not matched:
            continue
        kind = f"{type(layer).__name__}, not nn.Linear or a Conv1D-style layer"
        subclass = isinstance(layer, nn.Linear) and type(layer) is not nn.Linear
        if subclass:
            kind = (f"{type(layer).__name__}, an nn.Linear subclass "
                    "(sorsa_integrations probes those)")
        if targets and (W_0 is None or subclass):
            raise TypeError(f"{name} matches the targets but is {kind}; exclude it from them")
        reason = kind if subclass else why_skipped(name, layer)
        if reason:
            skipped.append(f"{name} ({reason})")
        else:
            _check_weight(W_0, rank, where=f" for layer {name}")
            selected.append(name)
    return _selected(selected, skipped)

def _convert(model, names, build):
    """Set each named layer to build(name) one at a time (each stays whole); train factors only."""
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
    for _, layer in sorsa_modules(model):
        for p in (layer.U_p, layer.S_p, layer.Vt_p):
            p.requires_grad_(True)
    return list(names)

def apply_sorsa(model, rank, target_modules=None, niter=None, factor_dtype=None):
    """Replace linear layers by SORSA layers in place, freeze the rest; return their names.
    target_modules: names (["q_proj", "v_proj"]: ends of module names), or None: every nn.Linear
    and Conv1D-style layer but the output head and tied weights. All is checked before a change."""
    model = _model_to_convert(model, "apply_sorsa")
    _check_args(rank, niter, factor_dtype)
    names = _select_targets(model, rank, _target_patterns(target_modules))

    def build(name):
        return SORSALinear.from_linear(model.get_submodule(name), rank, niter, factor_dtype)
    return _convert(model, names, build)

def merge_sorsa(model):
    """Replace every SORSA layer in place by its merge(), a layer of the type it replaced."""
    found = _adapted(model, spoiled="merge_sorsa merged nothing")
    for name, layer in found:  # one layer at a time: one extra layer's weight at most
        unwrap(model).set_submodule(name, layer.merge())
    return [name for name, _ in found]

# ------------------------------------------------------------------ adapters
ADAPTER_KEYS = ("U_p", "S_p", "Vt_p", "U_p0", "S_p0", "Vt_p0")  # per layer, in an adapter state
BASE_TOLERANCE = 0.05  # load_adapter's base check: the right base in bf16 gives ~1e-3, another ~1

def adapter_state_dict(model):
    """'{layer}.U_p', ..., '{layer}.Vt_p0': the trained and initial factors, on the CPU (FSDP2:
    on every rank). With the original base they give W_p,t - W_p,0: no W_r, no SVD."""
    found = _adapted(model, spoiled="no adapter state was made")
    return {f"{name}.{key}": _whole(getattr(layer, key)).detach().to("cpu", copy=True)
            for name, layer in found for key in ADAPTER_KEYS}

def _check_adapter_layer(name, base, parts, source):
    """Raise unless parts ({key: tensor}) fit the model's layer: keys, shapes, finite floats."""
    W_0 = _base_weight(base)
    if W_0 is None:
        what = "absent" if base is None else f"{type(base).__name__}, not nn.Linear or Conv1D-style"
        raise ValueError(f"{source}: layer {name!r} is in the adapter, but the model's is {what}; "
                         "is it the right base model? Nothing was changed")
    (m, n), S_p = W_0.shape, parts.get("S_p")
    r = S_p.shape[0] if torch.is_tensor(S_p) and S_p.dim() == 1 else 0
    shapes = {"U_p": (m, r), "S_p": (r,), "Vt_p": (r, n)}
    needs = {key: shapes[key.removesuffix("0")] for key in ADAPTER_KEYS}
    has = {key: tuple(getattr(v, "shape", ())) for key, v in parts.items()}
    bad = [k for k, v in parts.items() if not (torch.is_tensor(v) and v.is_floating_point())]
    bad += [k for k, v in parts.items() if k not in bad and not v.isfinite().all()]
    if has != needs or not 1 <= r <= min(m, n) or bad:
        got = f"{has} ({', '.join(bad)} not finite floats)" if bad else has
        raise ValueError(f"{source}: layer {name!r} has {got}, but the layer is {m}x{n} (out x "
                         f"in), which at rank {r} needs {needs}; is it the right base model? "
                         "Nothing was changed")

def _check_base(name, W_0, parts, source):
    """Raise unless W_0 is the weight the adapter was made from: U_p0^T W_0 V_p0 = diag(S_p0)."""
    wide = _wide_dtype(W_0.dtype, parts["U_p0"].dtype)
    U_0, S_0, Vt_0 = (parts[k].to(W_0.device, wide) for k in ("U_p0", "S_p0", "Vt_p0"))
    with torch.no_grad(), _ieee_float32():
        misfit = U_0.mT @ W_0.to(wide) @ Vt_0.mT - torch.diag(S_0)  # (r, r): 0 for the right base
        error = torch.linalg.matrix_norm(misfit) / S_0.norm()  # ~1e-3 in bf16, ~1 for another base
    if not error <= BASE_TOLERANCE:
        raise ValueError(f"{source}: layer {name} does not hold the weight the adapter was made "
                         f"from: ||U_p0^T W_0 V_p0 - diag(S_p0)||_F / ||S_p0|| = {error:.3g}, above"
                         f" {BASE_TOLERANCE}. The right base? Nothing was changed; "
                         "check_base=False loads it all the same")

def load_adapter(model, state, factor_dtype=None, check_base=True, source="the adapter state"):
    """Put an adapter_state_dict (torch.load a file) onto the original base: each layer with W_r =
    W_0 - U_p0 diag(S_p0) Vt_p0 (Eq. 2 with the saved initial factors: no SVD) and the trained
    factors. check_base refuses another base; all is checked before a layer changes."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be an adapter dict (a file: torch.load it first), got "
                        f"{type(state).__name__}")
    model = _model_to_convert(model, "load_adapter")
    _check_args(factor_dtype=factor_dtype)
    if not state:
        raise ValueError(f"{source}: an adapter state must be a non-empty dict")
    layers, named = {}, dict(model.named_modules())  # layers: {layer name: {key: tensor}}
    for key, tensor in state.items():
        name, _, part = str(key).rpartition(".")
        layers.setdefault(name, {})[part] = tensor
    for name, parts in layers.items():
        _check_adapter_layer(name, named.get(name), parts, source)
        if check_base:
            _check_base(name, _base_weight(named[name]), parts, source)

    def build(name):  # one layer at a time, as _convert asks
        base = model.get_submodule(name)
        W_0 = _base_weight(base).detach()  # (m, n)
        dtype = factor_dtype or _wide_dtype(W_0.dtype)
        U_p0, S_p0, Vt_p0 = (layers[name][k].to(W_0.device, dtype) for k in ADAPTER_KEYS[3:])
        wide = _wide_dtype(W_0.dtype, dtype)
        with torch.no_grad(), _ieee_float32():
            W_r = W_0.to(wide, memory_format=torch.contiguous_format, copy=True)  # (m, n)
            # Eq. 2, W_r = W_0 - U_p0 diag(S_p0) Vt_p0, subtracted in place
            W_r.addmm_(U_p0.to(wide) @ torch.diag(S_p0.to(wide)), Vt_p0.to(wide), alpha=-1)
        layer = SORSALinear(U_p0, S_p0, Vt_p0, W_r.to(W_0.dtype), base.bias, type(base))
        layer.load_state_dict({k: layers[name][k] for k in ("U_p", "S_p", "Vt_p")}, strict=False)
        return layer
    return _convert(model, list(layers), build)

# ------------------------------------------------------------------ analysis (Section 4)
def _svd64(W_0, W_t):
    """The SVDs of two weights of one shape in float64 on the CPU, as the paper advises (B.1)."""
    if not all(torch.is_tensor(W) and W.dim() == 2 for W in (W_0, W_t)) or W_0.shape != W_t.shape:
        raise ValueError(f"delta_sigma/delta_d need two 2-D weights of one shape, got "
                         f"{getattr(W_0, 'shape', W_0)} and {getattr(W_t, 'shape', W_t)}")
    return [torch.linalg.svd(W.detach().to("cpu", torch.float64), full_matrices=False)
            for W in (W_0, W_t)]

def delta_sigma(W_0, W_t):
    """Eq. 7: the mean absolute change of the min(m, n) singular values: (m, n), (m, n) -> float."""
    (_, S_0, _), (_, S_t, _) = _svd64(W_0, W_t)
    return (S_t - S_0).abs().mean().item()

def delta_d(W_0, W_t):
    """Eqs. 8-10: 1 - mean |cosine| of singular vectors paired by rank (|.|: sign-free): [0, 1]."""
    (U_0, _, Vt_0), (U_t, _, Vt_t) = _svd64(W_0, W_t)
    dU = (U_t * U_0).sum(dim=0).abs()  # (k,) Eq. 8: |<u_t^i, u_0^i>|
    dV = (Vt_t * Vt_0).sum(dim=1).abs()  # (k,) Eq. 9: |<v_t^i, v_0^i>|
    return 1.0 - (dU.sum() + dV.sum()).item() / (2 * dU.numel())  # Eq. 10
