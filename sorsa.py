"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation.

Reference implementation of arXiv:2409.00055, in one file that needs only torch (>= 2.9).
MIT License (see LICENSE): copy it into your own code.

The method in ten lines (PyTorch convention: a weight W_0 is (m, n) = (out, in)):

    W_0 = U diag(S) V^T                                   SVD of the pretrained weight
    U_p, S_p, Vt_p = U[:, :r], S[:r], V^T[:r, :]          trainable principal factors   (Eq. 1)
    W_r = W_0 - U_p diag(S_p) Vt_p                        frozen residual                (Eq. 2)
    SORSA(x) = x W_r^T + x (U_p diag(S_p) Vt_p)^T         equals x W_0^T at step 0       (Eq. 3)
    L_reg = ||U_p^T U_p - I||_F + ||Vt_p Vt_p^T - I||_F   orthonormal regularizer        (Eq. 4)
            averaged over the 2 L factor matrices of L layers, as the authors' code does
    loss  = L_train + (gamma / lr_max) L_reg              one optimizer, one scheduler   (Eq. 6)
    merge: nn.Linear(weight = W_r + U_p diag(S_p) Vt_p)   no inference latency

PiSSA is the same split with U_p diag(S_p)^(1/2) and diag(S_p)^(1/2) Vt_p trained as
two matrices and no regularizer; SORSA keeps U_p, S_p and Vt_p apart and regularizes.

Map of the file: the method (svd_split, SORSALinear, orthonormal_regularizer, sorsa_loss or
add_regularizer_grad, cosine_schedule, apply_sorsa, merge_sorsa); adapters and their files; the
analysis metrics (delta_sigma, delta_d); the checks; precision helpers and the glue for DDP, FSDP2
and torch.compile.

Precision, as in mixed-precision training: what trains (U_p, S_p, Vt_p, their initial copies) is
stored in float32 (float64 stays float64), since bf16 would round away updates below 1/256 of an
entry; what is frozen (W_r, the bias) keeps the weight's dtype; the forward computes in the
activations' dtype; the SVD, the residual, the regularizer and the merge are computed in float32
or wider, with full float32 matmuls even where the caller allows TF32, and cast once.
"""

import contextlib
import ctypes
import difflib
import hashlib
import json
import math
import os
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard

ADAPTER_KEYS = ("U_p", "S_p", "Vt_p", "U_p0", "S_p0", "Vt_p0")  # per layer, in an adapter file
FULL = "modules_to_save"  # '{name}.modules_to_save.{key}': a module trained in full, in an adapter file
BASE_TOLERANCE = 0.05  # load_adapter's base check: bf16 rounding of the right base gives ~1e-3, another model ~1


# ----------------------------------------------------------------------------- SVD split (Eqs. 1-2)


def _add_W_p(W, U_p, S_p, Vt_p, alpha):
    """W + alpha U_p diag(S_p) Vt_p, computed wide and cast once to W's dtype: (m, n) -> (m, n).

    alpha = -1 gives W_r = W_0 - W_p (Eq. 2), a difference rather than U_r diag(S_r) V_r^T, so that
    W_r + W_p (alpha = +1, the merge) gives back W_0 to one rounding whatever the factors' accuracy.
    """
    cd = _exact_dtype(W.dtype, U_p.dtype)  # float32, or float64 if either is
    out = W.detach().to(cd, memory_format=torch.contiguous_format, copy=True)  # (m, n), the one temporary
    with _full_float32():  # no TF32 or bf16 passes, whatever the caller allows
        out.addmm_(U_p.to(cd) * S_p.to(cd), Vt_p.to(cd), alpha=alpha)  # diag(S_p) as a column scale
    return out.to(W.dtype)


def _randomized_svd(W, rank, niter, sketch):
    """Top-`rank` SVD of W (m, n) from a random sketch of `sketch` columns and `niter` power iterations,
    seeded: one weight always gives one split."""
    gen = torch.Generator(device=W.device).manual_seed(0)
    Q = torch.linalg.qr(W @ torch.randn(W.shape[1], sketch, generator=gen, device=W.device, dtype=W.dtype)).Q  # (m, l)
    for _ in range(niter):  # each iteration sharpens a decaying spectrum; QR keeps the basis well conditioned
        Q = torch.linalg.qr(W @ torch.linalg.qr(W.T @ Q).Q).Q  # (m, l)
    U_small, S, Vt = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (l, l), (l,), (l, n)
    return (Q @ U_small)[:, :rank], S[:rank], Vt[:rank]  # (m, r), (r,), (r, n)


def _orthonormal(F):
    """F (k, r) with orthonormal columns to its dtype's rounding, each column kept itself (signs fixed).
    A float32 SVD's vectors are orthonormal only to its backward error, ~100 roundings; one float64 QR
    moves each entry about that much. W_r absorbs the move."""
    Q, R = torch.linalg.qr(F.double())  # (k, r), (r, r) with a diagonal of ~+-1
    return (Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).to(F.dtype)


def _top_triplets(weight, rank, niter):
    """U_p (m, r), S_p (r,), Vt_p (r, n) of the weight (Eq. 1), orthonormalized, in float32 or float64
    (bf16 and fp16 SVDs fail or are far off). Returning frees the wide copy, U and V^T."""
    W = weight.detach().to(_exact_dtype(weight.dtype))  # (m, n), upcast by assignment
    sketch = rank + max(rank, 10)  # oversampled, for accurate top singular values
    if niter is not None and sketch < min(W.shape):
        U_p, S_p, Vt_p = _randomized_svd(W, rank, niter, sketch)
    else:
        U, S, Vt = torch.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
        U_p, S_p, Vt_p = U[:, :rank], S[:rank], Vt[:rank]
    return _orthonormal(U_p), S_p, _orthonormal(Vt_p.mT).mT


def svd_split(weight, rank, niter=None, factor_dtype=None):
    """Split W_0 (m, n) into U_p (m, r), S_p (r,), Vt_p (r, n) and W_r (m, n) (Eqs. 1-2).

    niter None: exact SVD; an int: randomized SVD with that many power iterations, much faster for
    large weights (docs/performance.md); W_r makes the layer exact either way. The factors come back
    in factor_dtype (default float32, float64 for a float64 weight), W_r in the weight's dtype.
    On the meta device only shapes exist: empty meta tensors come back.
    """
    _check_weight(weight)
    m, n = weight.shape
    _check_rank(rank, m, n)
    _check_niter(niter)
    factor_dtype = _check_factor_dtype(factor_dtype) or _exact_dtype(weight.dtype)
    if weight.is_meta:
        return (*(torch.empty(shape, device="meta", dtype=factor_dtype) for shape in ((m, rank), (rank,), (rank, n))),
                torch.empty_like(weight))
    with torch.no_grad(), _full_float32():  # the sketch's products too at full precision
        U_p, S_p, Vt_p = (t.to(factor_dtype, memory_format=torch.contiguous_format, copy=True)
                          for t in _top_triplets(weight, rank, niter))
        # Eq. 2 from the stored factors, so that a narrow factor_dtype's rounding goes into W_r.
        return U_p, S_p, Vt_p, _add_W_p(weight, U_p, S_p, Vt_p, alpha=-1)


# ----------------------------------------------------------------------------- the layer (Eq. 3)


def _base_weight(layer):
    """W_0 (out, in) of a layer SORSA can replace, or None: an nn.Linear's weight (subclasses too), or
    the transposed weight of a Conv1D-style layer (transformers' Conv1D, as in GPT-2: attribute nf,
    weight (in, out), y = x W + b; recognized by name and shape, without importing transformers)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    weight = getattr(layer, "weight", None)
    conv1d = type(layer).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
    return weight.mT if conv1d and weight.shape[1] == getattr(layer, "nf", None) else None


class SORSALinear(nn.Module):
    """y = x W_r^T + ((x Vt_p^T) * S_p) U_p^T + b (Eq. 3): x (..., n) -> y (..., m).

    Trainable: U_p (m, r), S_p (r,), Vt_p (r, n), r (m + n + 1) numbers. Frozen (requires_grad=False):
    W_r (m, n), the bias, and the initial U_p0, S_p0, Vt_p0, from which the learned change
    W_p,t - W_p,0 is exported. base_type: the class of the replaced layer, which merge() gives back.
    """

    def __init__(self, U_p, S_p, Vt_p, W_r, bias=None, base_type=nn.Linear):
        super().__init__()
        (m, r), n = U_p.shape, W_r.shape[1]
        if S_p.shape != (r,) or Vt_p.shape != (r, n) or W_r.shape != (m, n):
            raise ValueError(f"inconsistent SORSA shapes: U_p {tuple(U_p.shape)}, S_p {tuple(S_p.shape)}, Vt_p "
                             f"{tuple(Vt_p.shape)}, W_r {tuple(W_r.shape)}; expected (m, r), (r,), (r, n), (m, n)")
        self.in_features, self.out_features, self.rank, self.base_type = n, m, r, base_type
        self.U_p, self.S_p, self.Vt_p = (nn.Parameter(t.detach().clone()) for t in (U_p, S_p, Vt_p))
        self.W_r = nn.Parameter(W_r.detach(), requires_grad=False)  # (m, n), not copied: as large as the weight
        self.U_p0, self.S_p0, self.Vt_p0 = (nn.Parameter(t.detach().clone(), requires_grad=False)
                                            for t in (U_p, S_p, Vt_p))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, rank, niter=None, factor_dtype=None):
        """A ready SORSA layer whose output equals `linear`'s (Eq. 3 at t = 0); `linear` is an
        nn.Linear or a Conv1D-style layer (weight (in, out), y = x W + b), split as W_0 = weight^T."""
        W_0 = _base_weight(linear)
        if W_0 is None:
            raise TypeError(f"from_linear needs an nn.Linear or a Conv1D-style layer (transformers' Conv1D: "
                            f"attribute nf, weight (in, out)), got {type(linear).__name__}")
        return cls(*svd_split(W_0, rank, niter, factor_dtype), linear.bias, type(linear))

    @property
    def weight(self):
        """W_r in the replaced layer's layout, for code that reads a layer's weight for its dtype, device or
        shape (T5 casts its input to wo.weight.dtype). Not the effective weight: merge() builds that."""
        return self.W_r if issubclass(self.base_type, nn.Linear) else self.W_r.mT

    def forward(self, x):
        # Factored: r (m + n) multiply-adds per token, like LoRA, and the (m, n) W_p is never formed.
        # The float32 factors are cast to the activations' dtype; their gradients come back in float32.
        low = F.linear(x, self.Vt_p.to(x.dtype))  # (..., r)
        low = low * self.S_p.to(low.dtype)  # diag(S_p) as an elementwise scale
        return F.linear(x, self.W_r, self.bias) + F.linear(low, self.U_p.to(low.dtype))  # (..., m)

    def merge(self):
        """A frozen layer of the replaced type (nn.Linear for a subclass with its own constructor) with
        weight W_r + U_p diag(S_p) Vt_p: no inference latency, the original state-dict keys."""
        # full_tensor: the tensor itself in one process; under FSDP2, the shards gathered.
        W = _add_W_p(*(full_tensor(t) for t in (self.W_r, self.U_p, self.S_p, self.Vt_p)), alpha=+1)  # (m, n)
        linear = issubclass(self.base_type, nn.Linear)
        with torch.device("meta"):  # shapes only: the weights are assigned below, nothing is initialized
            if not linear:
                layer = self.base_type(self.out_features, self.in_features)  # Conv1D(nf, nx)
            else:
                cls = self.base_type if self.base_type.__init__ is nn.Linear.__init__ else nn.Linear
                layer = cls(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight = nn.Parameter(W if linear else W.mT.contiguous(), requires_grad=False)
        layer.bias = None if self.bias is None else nn.Parameter(full_tensor(self.bias).detach().clone(),
                                                                 requires_grad=False)
        return layer

    def extra_repr(self):
        layout = "" if self.base_type is nn.Linear else f", replacing {self.base_type.__name__}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{layout}"


# ----------------------------------------------------------------------------- regularizer (Eq. 4), update (Eq. 6)


class _GramDistance(torch.autograd.Function):
    """Eq. 4's term ||F^T F - I||_F (squared=True: its square) of each factor in a stack F (L, k, r) -> (L,),
    with its gradient written out, A = F^T F - I (at A = 0 the subgradient 0):

        d ||A||_F / dF = 2 F A / ||A||_F        d ||A||_F^2 / dF = 4 F A

    Both directions run in full float32 (or float64) with autocast off: left to autograd, the backward's
    products would run later, at whatever precision the caller set then.
    """

    @staticmethod
    def forward(ctx, F, squared, group):
        with torch.autocast(F.device.type, enabled=False), _full_float32():
            # F^T F (L, r, r). In one process _sum_over_ranks does nothing; group is FSDP2's ranks holding
            # F's other rows, whose Grams add up to F^T F (and each rank's rows get 2 F_local A / ||A||).
            gram = _sum_over_ranks(F.mT @ F, group)
            A = gram - torch.eye(F.shape[-1], device=F.device, dtype=F.dtype)  # (L, r, r)
            norms = torch.linalg.matrix_norm(A)  # (L,)
        ctx.save_for_backward(F, A, norms)
        ctx.squared = squared
        return norms.square() if squared else norms

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        F, A, norms = ctx.saved_tensors
        scale = 4 * grad if ctx.squared else torch.where(norms > 0, 2 * grad / norms, 0.0)  # (L,)
        with torch.autocast(F.device.type, enabled=False), _full_float32():
            return (F @ A) * scale[:, None, None], None, None  # (L, k, r)


def _factor_stacks(found):
    """(F, group) per factor shape: F (L, k, r) stacks the U_p (m, r) and Vt_p^T (n, r) of that shape in
    float32 or wider, so that one batched product serves them all. group is None in one process; under
    FSDP2, _local_rows gives the rows this rank holds and the ranks holding the others."""
    stacks = {}  # (shape, dtype, device, group) -> factors; keyed by the whole shape, alike on every rank
    for _, mod in found:
        for factor in (mod.U_p, mod.Vt_p.mT):
            local, group = _local_rows(factor)  # (factor, None) in one process
            stacks.setdefault((factor.shape, local.dtype, local.device, group), []).append(local)
    return [(torch.stack(fs).to(_exact_dtype(dtype)), group) for (_, dtype, _, group), fs in stacks.items()]


def orthonormal_regularizer(model_or_modules, squared=False, reduction="mean"):
    """L_reg: Eq. 4, ||U_p^T U_p - I||_F + ||Vt_p Vt_p^T - I||_F, summed over the layers; a scalar.

    reduction "mean" (default) divides by the 2 L factor matrices, as the authors' code does: their
    gamma was tuned on that scale (docs/gamma.md). "sum" is Eq. 5 as written, 2 L times the mean.
    squared=True sums squared norms, whose gradient, unlike the paper's, vanishes at orthonormality.
    """
    _check_model_type(model_or_modules, "model_or_modules")
    _check_reduction(reduction)
    found = _require_adapters(model_or_modules)
    terms = [_GramDistance.apply(F, squared, group).sum()  # Eq. 4: one norm per factor matrix
             for F, group in _factor_stacks(found)]  # every U_p and Vt_p^T, stacked by shape: F (L, k, r)
    total = sum(t.to(terms[0].device) for t in terms)
    return total / (2 * len(found)) if reduction == "mean" else total


def sorsa_loss(train_loss, model, gamma, lr_max, squared=False, reduction="mean"):
    """L_train + (gamma / lr_max) L_reg, the loss whose gradient step is Eq. 6.

    A step of size eta_t on it is W_p - eta_t grad L_train - gamma_t grad L_reg with gamma_t = gamma
    eta_t / lr_max: Eq. 5 with one optimizer and one scheduler (exact for SGD; AdamW rescales the sum).
    Clipping after its backward clips both terms; the authors clip the task gradient alone, as
    add_regularizer_grad does, which this file recommends.
    """
    if not isinstance(train_loss, torch.Tensor) or train_loss.numel() != 1:
        raise TypeError(f"train_loss must be the task loss as a one-element tensor, got {_describe(train_loss)}; "
                        "the order is sorsa_loss(train_loss, model, gamma, lr_max)")
    _check_model_type(model, "model")
    _check_gamma(gamma, lr_max)
    if gamma == 0:
        return train_loss
    return train_loss + (gamma / lr_max) * orthonormal_regularizer(model, squared, reduction)


def add_regularizer_grad(model, gamma, lr_max, squared=False, reduction="mean"):
    """Add the gradient of (gamma / lr_max) L_reg to the factors' .grad (Eq. 6's second term) after the
    task gradient was clipped, as the authors do; return L_reg, detached. The paper's runs had
    gamma = 6.25e-6 at lr_max = 3e-5 (docs/gamma.md). Call it once per optimizer step, also with
    gradient accumulation (nothing divides it by the count), and under DDP without an all-reduce:

        task_loss.backward(); clip_grad_norm_(params, 1.0)
        add_regularizer_grad(model, gamma=6.25e-6, lr_max=3e-5); optimizer.step(); scheduler.step()
    """
    _check_model_type(model, "model")
    _check_gamma(gamma, lr_max)
    reg = orthonormal_regularizer(model, squared, reduction)
    if gamma > 0:
        ((gamma / lr_max) * reg).backward()
    return reg.detach()


def cosine_schedule(optimizer, total_steps, warmup_ratio=0.03):
    """The paper's schedule (App. B): linear warm-up over 3% of the steps, then cosine decay to 0.
    Its peak is the optimizer's lr, the lr_max of Eq. 6."""
    warmup = max(1, round(warmup_ratio * total_steps))

    def factor(step):  # multiplies the optimizer's lr at `step`
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- a model: apply and merge


def sorsa_modules(model):
    """(name, SORSALinear) pairs of a model (wrappers seen through), or of an iterable of layers."""
    if isinstance(model, nn.Module):
        return [(name, mod) for name, mod in unwrap(model).named_modules() if isinstance(mod, SORSALinear)]
    layers = list(model)
    bad = [type(mod).__name__ for mod in layers if not isinstance(mod, SORSALinear)]
    if bad:
        raise TypeError(f"expected a model or SORSALinear layers, got {', '.join(sorted(set(bad)))}")
    return [(str(i), mod) for i, mod in enumerate(layers)]


def full_modules(model):
    """(name, module) pairs of the modules that train in full beside the adapters (modules_to_save)."""
    return [(name, mod) for name, mod in unwrap(model).named_modules() if getattr(mod, "sorsa_trains_in_full", False)]


def _convert(model, names, build, full):
    """Set each layer `name` to build(name), one at a time (one extra layer's weight at most), then mark
    the modules of `full` ({name: state dict to load, or None}) to train in full, and freeze the rest.
    A failure midway (out of memory, Ctrl-C) leaves every layer wholly original or wholly SORSA."""
    done = []
    try:
        for name in names:
            model.set_submodule(name, build(name))
            done.append(name)
    except BaseException as err:
        err.add_note(f"SORSA: {len(done)} of {len(names)} layers were converted before this error: "
                     f"{', '.join(done) or 'none'}. Each layer is wholly original or wholly SORSA; "
                     "merge_sorsa(model) turns the converted ones back into nn.Linear")
        raise
    for name, state in full.items():
        mod = model.get_submodule(name)
        if state is not None:
            mod.load_state_dict(state)
        mod.sorsa_trains_in_full = True
    model.requires_grad_(False)
    for _, mod in sorsa_modules(model):
        for p in (mod.U_p, mod.S_p, mod.Vt_p):
            p.requires_grad_(True)
    for _, mod in full_modules(model):
        mod.requires_grad_(True)
    return list(names)


def apply_sorsa(model, rank, target_modules=None, niter=None, factor_dtype=None, modules_to_save=None):
    """Replace linear layers by SORSA layers in place and freeze the rest; return the layers' names.

    target_modules None (or "all-linear"): every layer computing x W^T + b (nn.Linear and Conv1D-style)
    but, with a warning, the output head, tied weights, layers with fewer outputs than the rank and
    nn.MultiheadAttention's out_proj; or names such as ["q_proj", "v_proj"], matched against the end of
    module names. modules_to_save: modules that train in full and travel with the adapter (a new head:
    ["classifier"]), as in PEFT. Everything is checked before the first layer is touched.
    """
    model = _check_unwrapped_module(model, "apply_sorsa")
    _check_rank(rank)
    _check_niter(niter)
    _check_factor_dtype(factor_dtype)
    full = _select_full(model, modules_to_save)
    names = _select_targets(model, rank, _normalize_targets(target_modules), full)

    def build(name):
        return SORSALinear.from_linear(model.get_submodule(name), rank, niter, factor_dtype)

    return _convert(model, names, build, dict.fromkeys(full))


def merge_sorsa(model):
    """Replace every SORSA layer in place by its merge(), a layer of the type it replaced; return the names."""
    found = _require_adapters(model)
    _check_finite_factors(found, "merge_sorsa merged nothing")
    for name, mod in found:  # one layer at a time: one extra layer's weight at most
        unwrap(model).set_submodule(name, mod.merge())
    return [name for name, _ in found]


# ----------------------------------------------------------------------------- adapters and their files


def adapter_state_dict(model):
    """Per layer the trained factors and the initial ones ('{name}.U_p', ..., '{name}.Vt_p0'), and the
    state of each module trained in full ('{name}.modules_to_save.{key}'): CPU copies (FSDP2 shards
    gathered: call it on every rank). With both factors the change W_p,t - W_p,0 goes onto the
    original base model (whose weight is W_r + W_p,0) without W_r and without a new SVD."""
    found = _require_adapters(model)
    _check_finite_factors(found, "no adapter state was made")
    state = {f"{name}.{key}": getattr(mod, key) for name, mod in found for key in ADAPTER_KEYS}
    state.update({f"{name}.{FULL}.{key}": t for name, mod in full_modules(model) for key, t in mod.state_dict().items()})
    return {key: full_tensor(t).detach().to("cpu", copy=True) for key, t in state.items()}


def save_adapter(model, path):
    """Write adapter_state_dict(model) to `path` atomically, with a checksum (save_checked). Under
    torch.distributed call it on every rank: rank 0 writes, every rank returns once the file is complete."""
    state = adapter_state_dict(model)  # every rank: FSDP2's shards are gathered
    _rank_0_writes(lambda: save_checked(state, path), path)


def load_adapter(model, state, factor_dtype=None, check_base=True):
    """Put a saved adapter (a dict or a file path) onto the original base model; return the layers' names.

    Each layer (W_0) becomes a SORSA layer with W_r = W_0 - W_p,0 and the trained factors: weight
    W_0 + (W_p,t - W_p,0), with no SVD. check_base refuses another base (the initial factors are W_0's
    top-r triplets: U_p0^T W_0 V_p0 = diag(S_p0)). Everything is checked before the model is touched.
    """
    model = _check_unwrapped_module(model, "load_adapter")
    _check_factor_dtype(factor_dtype)
    if not isinstance(state, (dict, str, os.PathLike)):
        raise TypeError(f"state must be an adapter dict or a file path, got {_describe(state)}")
    source, state = ("the adapter state", state) if isinstance(state, dict) else \
        (f"adapter file {state}", load_checked(state)[0])
    layers, full = _group_adapter_state(state, source)
    if sorsa_modules(model):
        raise ValueError("the model already has SORSA adapters; load an adapter onto the base model")
    for name, parts in layers.items():
        _check_adapter_layer(model, name, parts, source)
        if check_base:
            _check_base(_base_weight(model.get_submodule(name)), parts, f"{source}: layer {name}")
    for name, parts in full.items():
        _check_full_module(model, name, parts, source)

    def build(name):
        base = model.get_submodule(name)
        W_0 = _base_weight(base)
        p = {k: v.to(W_0.device, factor_dtype or _exact_dtype(W_0.dtype)) for k, v in layers[name].items()}
        W_r = _add_W_p(W_0, p["U_p0"], p["S_p0"], p["Vt_p0"], alpha=-1)  # Eq. 2 with the saved initial factors
        layer = SORSALinear(p["U_p0"], p["S_p0"], p["Vt_p0"], W_r, base.bias, type(base))
        with torch.no_grad():
            for key in ("U_p", "S_p", "Vt_p"):
                getattr(layer, key).copy_(p[key])
        return layer

    return _convert(model, list(layers), build, full)


def lora_state_dict(model):
    """The learned change as plain LoRA factors, '{name}.lora_A.weight' (2r, n) and '.lora_B.weight' (m, 2r):
    B A = U_p,t diag(S_p,t) Vt_p,t - U_p,0 diag(S_p,0) Vt_p,0 = W_p,t - W_p,0, which any LoRA loader adds
    to the original base weight with scaling 1. A module trained in full comes whole, '{name}.{key}'."""
    state = adapter_state_dict(model)
    out = {k.replace(f".{FULL}.", "."): v for k, v in state.items() if f".{FULL}." in k}
    for name, mod in sorsa_modules(model):
        U, S, Vt, U0, S0, Vt0 = (state[f"{name}.{key}"] for key in ADAPTER_KEYS)
        out[f"{name}.lora_A.weight"] = torch.cat([Vt, Vt0], dim=0)  # (2r, n)
        out[f"{name}.lora_B.weight"] = torch.cat([U * S, -U0 * S0], dim=1)  # (m, 2r)
    return out


def save_lora(model, directory, base_name=None):
    """Write the learned change as a PEFT LoRA adapter, for PeftModel.from_pretrained(base, directory).

    adapter_model.bin: lora_state_dict(model) under PEFT's keys, by torch.save (PEFT reads it without
    safetensors). adapter_config.json: r = lora_alpha = 2 rank (scaling 1), fan_in_fan_out for Conv1D-
    style layers, modules trained in full as modules_to_save. Call it on every rank, as save_adapter.
    """
    weights = {f"base_model.model.{k}": v for k, v in lora_state_dict(model).items()}
    found = sorsa_modules(model)
    rank_of = {name: 2 * mod.rank for name, mod in found}
    r = max(rank_of.values())
    others = {name: rr for name, rr in rank_of.items() if rr != r}  # per-layer ranks, if they differ
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_name,
              "r": r, "lora_alpha": r, "rank_pattern": others, "alpha_pattern": others,
              "target_modules": sorted(rank_of), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": all(not issubclass(mod.base_type, nn.Linear) for _, mod in found),
              "modules_to_save": [name for name, _ in full_modules(model)] or None,
              "init_lora_weights": True, "inference_mode": True}

    def write():
        os.makedirs(directory, exist_ok=True)
        write_atomically(os.path.join(directory, "adapter_model.bin"), lambda f: torch.save(weights, f))
        write_atomically(os.path.join(directory, "adapter_config.json"),
                         lambda f: f.write(json.dumps(config, indent=2).encode()))
    _rank_0_writes(write, directory)


def write_atomically(path, write):
    """Call write(file) on a new temporary file beside `path`, flush it to disk, then rename it: `path`
    holds the old content or the new, never half. The mode is a plain open()'s (0666 less the umask)."""
    directory, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(directory, f".{name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as to open()
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def save_checked(tensors, path, **extra):
    """Atomically torch.save {'tensors': tensors, 'sha256': their checksum, **extra} to `path`."""
    content = {"tensors": tensors, "sha256": _sha256(tensors), **extra}
    write_atomically(path, lambda f: torch.save(content, f))


def load_checked(path):
    """(tensors, extra) from a save_checked file; a ValueError naming the file if it is truncated,
    corrupted (torch.load does not notice flipped bytes inside a tensor) or of another kind."""
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
        if _sha256(content["tensors"]) != content["sha256"]:
            raise ValueError("its checksum does not match its contents")
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Exception as err:
        raise ValueError(f"cannot use {path}: it is truncated, corrupted or not written by this code "
                         f"({type(err).__name__}: {err})") from None
    return content["tensors"], {k: v for k, v in content.items() if k not in ("tensors", "sha256")}


def _sha256(tensors):
    """SHA-256 of the names, dtypes, shapes and bytes of a dict of tensors."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()  # host memory, one block
        h.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(ctypes.string_at(t.data_ptr(), t.nbytes))  # any dtype's bytes, bf16 too, without numpy
    return h.hexdigest()


# ----------------------------------------------------------------------------- analysis (Section 4)


def _svd64(W_0, W_t):
    """SVDs of two same-shape weights in float64 on the CPU, as the paper advises (App. B.1)."""
    tensors = isinstance(W_0, torch.Tensor) and isinstance(W_t, torch.Tensor)
    if not tensors or W_0.dim() != 2 or W_0.shape != W_t.shape:
        raise ValueError(f"delta_sigma/delta_d need two 2-D weights of one shape, got "
                         f"{tuple(getattr(W_0, 'shape', ()))} and {tuple(getattr(W_t, 'shape', ()))}")
    return [torch.linalg.svd(W.detach().to("cpu", torch.float64), full_matrices=False) for W in (W_0, W_t)]


def delta_sigma(W_0, W_t):
    """Eq. 7: mean absolute change of the k = min(m, n) singular values, (m, n), (m, n) -> float."""
    (_, S_0, _), (_, S_t, _) = _svd64(W_0, W_t)
    return (S_t - S_0).abs().mean().item()


def delta_d(W_0, W_t):
    """Eqs. 8-10: 1 - mean |cosine| between matching singular vectors, (m, n), (m, n) -> float in [0, 1].
    Vectors are matched by rank order, meaningful where singular values are distinct; the absolute
    value removes the SVD's sign ambiguity."""
    (U_0, _, Vt_0), (U_t, _, Vt_t) = _svd64(W_0, W_t)
    dU = (U_t * U_0).sum(dim=0).abs()  # (k,) Eq. 8: |<u_t^i, u_0^i>|
    dV = (Vt_t * Vt_0).sum(dim=1).abs()  # (k,) Eq. 9: |<v_t^i, v_0^i>|
    return 1.0 - (dU.sum() + dV.sum()).item() / (2 * dU.numel())  # Eq. 10


# ----------------------------------------------------------------------------- checks: bad input fails first


def _describe(value):
    return f"a tensor of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else \
        f"{type(value).__name__} {value!r}"


def _check_rank(rank, m=None, n=None, where=""):
    """Raise unless rank is an int (in [1, min(m, n)] if given); `where` names the layer for the message."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")
    if m is not None and not 1 <= rank <= min(m, n):
        raise ValueError(f"rank {rank} is outside [1, min(out, in)] = [1, {min(m, n)}]{where}; "
                         f"choose a rank between 1 and {min(m, n)}")


def _check_niter(niter):
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be None (exact SVD) or an int >= 0, got {niter!r}")


def _check_gamma(gamma, lr_max):
    for name, value in (("gamma", gamma), ("lr_max", lr_max)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{name} must be a number, got {_describe(value)}")
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}; gamma = 0 trains SORSA without the regularizer")
    if not lr_max > 0:
        raise ValueError(f"lr_max must be the scheduler's largest learning rate (> 0), got {lr_max}")


def _check_reduction(reduction):
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' (over factor matrices, as the authors' code; the default) "
                         f"or 'sum' (over layers, as Eq. 5 is written), got {reduction!r}")


def _check_factor_dtype(factor_dtype):
    """factor_dtype itself, after checking it is None or a floating torch.dtype."""
    if factor_dtype is not None and not (isinstance(factor_dtype, torch.dtype) and factor_dtype.is_floating_point):
        raise TypeError(f"factor_dtype must be None (float32) or a floating torch.dtype, got {factor_dtype!r}")
    return factor_dtype


def _check_weight(weight, where=""):
    """Raise unless weight is a 2-D floating tensor with only finite values (meta: shape only)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight{where} must be a 2-D tensor (out, in), got {getattr(weight, 'shape', weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight{where} has dtype {weight.dtype}; SORSA needs a floating weight "
                        "(float32, float64, bfloat16 or float16): dequantize or cast it first")
    if not weight.is_meta and not torch.isfinite(weight).all():
        raise ValueError(f"weight{where} contains NaN or Inf; the SVD of a non-finite matrix is undefined")


def _check_model_type(model, argument):
    if isinstance(model, (torch.Tensor, str, bytes)) or not (isinstance(model, nn.Module) or hasattr(model, "__iter__")):
        raise TypeError(f"{argument} must be an nn.Module or a list of SORSALinear layers, got {_describe(model)}")


def _check_unwrapped_module(model, verb):
    """The model to convert, seen through torch.compile; DDP and PEFT must come after adapting."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{verb} needs an nn.Module as its model, got {_describe(model)}")
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        raise TypeError(f"{verb} changes the model's layers, which {type(model).__name__} has already registered; "
                        f"call {verb} on the plain model first, then wrap it")
    model = unwrap(model)
    peft = sorted({type(mod).__name__ for mod in model.modules() if type(mod).__module__.split(".")[0] == "peft"})
    if peft:  # found by module path, without importing peft
        raise TypeError(f"{verb} needs the base model, but this one holds PEFT's {', '.join(peft)} (another "
                        f"adapter method, e.g. from get_peft_model); nothing was changed. Call {verb} on the model "
                        "before PEFT wraps it, or on peft_model.merge_and_unload()")
    return model


def _require_adapters(model):
    found = sorsa_modules(model)
    if not found:
        raise ValueError("the model has no SORSA adapters; call apply_sorsa(model, rank) first")
    return found


def _check_finite_factors(found, consequence):
    for name, mod in found:
        for key in ("U_p", "S_p", "Vt_p"):
            if not torch.isfinite(full_tensor(getattr(mod, key))).all():
                raise ValueError(f"layer {name}: {key} contains NaN or Inf (training diverged); {consequence}. "
                                 "Restart from the last good adapter with a lower learning rate")


def _normalize_targets(target_modules, argument="target_modules"):
    """None (all linear layers: None or "all-linear"), or a non-empty tuple of name patterns."""
    if target_modules is None or target_modules == "all-linear" and argument == "target_modules":
        return None
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"{argument} must be None, a name or a list of names, got {target_modules!r}")
    return targets


def _matches(name, target):
    """A module name matches a pattern if it is the pattern or ends with '.' + pattern."""
    return name == target or name.endswith("." + target)


def _computes_linear(layer):
    """Whether a layer computes x W^T + b: true of nn.Linear's own forward; an nn.Linear subclass with its
    own forward (Falcon's FalconLinear) is run on a seeded probe and compared with F.linear (a router or
    a quantized layer does not match). On the meta device it cannot be told: true."""
    if not isinstance(layer, nn.Linear) or type(layer).forward is nn.Linear.forward or layer.weight.is_meta:
        return True
    W = layer.weight
    x = torch.randn(2, layer.in_features, generator=torch.Generator(device=W.device).manual_seed(0), device=W.device)
    try:
        with torch.no_grad():
            y, expected = layer(x.to(W.dtype)), F.linear(x.to(W.dtype), W, layer.bias)
    except Exception:  # a weight F.linear cannot use (float8, int8) or a forward that wants more
        return False
    return (isinstance(y, torch.Tensor) and y.shape == expected.shape and
            torch.allclose(y.float(), expected.float(), rtol=0, atol=1e-2 * expected.float().abs().max().item() + 1e-30))


def _unfit(model, name, mod):
    """Why a layer with a weight cannot be adapted, or None: its parent reads its weight instead of calling
    it (nn.MultiheadAttention's out_proj: a SORSA layer there would be bypassed), or its forward is not
    x W^T + b."""
    if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
        return f"{type(mod).__name__}, whose weight its parent nn.MultiheadAttention reads directly"
    return None if _computes_linear(mod) else f"{type(mod).__name__}, whose forward is not x W^T + b"


def _select_full(model, modules_to_save):
    """Names of the modules that train in full, one per pattern in modules_to_save (matched as targets)."""
    patterns = () if modules_to_save is None else _normalize_targets(modules_to_save, "modules_to_save")
    names = []
    for pattern in patterns:
        found = [name for name, _ in model.named_modules() if name and _matches(name, pattern)]
        if not found:
            raise ValueError(f"modules_to_save {pattern!r} matches no module of the model; nothing was changed")
        names += [name for name in found if not any(name.startswith(f + ".") for f in found)]
    return sorted(set(names))


def _check_targets_match(model, targets):
    """Raise unless every pattern matches a module, suggesting near layer names."""
    modules = [(name, mod) for name, mod in model.named_modules() if name]
    for target in targets:
        if not any(_matches(name, target) for name, _ in modules):
            linears = [name for name, mod in modules if _base_weight(mod) is not None]
            suffixes = {".".join(name.split(".")[i:]) for name in linears for i in range(name.count(".") + 1)}
            near = difflib.get_close_matches(target, suffixes, n=5, cutoff=0.6) or sorted(
                {name.rsplit(".", 1)[-1] for name in linears})[:8]
            raise ValueError(f"target {target!r} matches no layer of the model; nothing was changed. "
                             f"Near names: {', '.join(near) or 'none: the model has no nn.Linear'}")


def _left_out_by_default(name, mod, rank, head, tied):
    """Why target_modules=None leaves a layer out, or None: the output head (lm_head, or `head`, what
    get_output_embeddings() returns), a weight tied to others (`tied`: their names), or fewer outputs
    than the rank."""
    if name.rsplit(".", 1)[-1] == "lm_head" or mod is head:
        return "the output head"
    m, n = _base_weight(mod).shape
    return (f"tied to {', '.join(tied)}" if tied else f"rank {rank} is above its {m} outputs: a new "
            "classification head trains in full with modules_to_save" if m < rank <= n else None)


def _select_targets(model, rank, targets, full=()):
    """Names of the layers to adapt, after checking every pattern and every layer (see apply_sorsa);
    layers inside the modules that train in full (`full`) are left out."""
    if sorsa_modules(model):
        raise ValueError("the model already has SORSA adapters; adapting twice would split the split. "
                         "Call merge_sorsa(model) first, or start from the base model")
    _check_targets_match(model, targets or ())
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    owners = {}  # id(parameter) -> every name it has: tied weights share one
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    selected, skipped = [], []
    for name, mod in model.named_modules():
        W_0 = _base_weight(mod)
        inside = [f for f in full if name == f or name.startswith(f + ".")]
        tied = [o for o in owners.get(id(mod.weight), []) if o != f"{name}.weight"] if W_0 is not None else []
        if targets is None:  # every linear layer but what a default cannot adapt safely, named in a warning
            if W_0 is None or not name or inside:
                continue
            problem = _unfit(model, name, mod) or _left_out_by_default(name, mod, rank, head, tied)
            if problem:
                skipped.append(f"{name} ({problem})")
                continue
        elif name and any(_matches(name, t) for t in targets):  # named by the caller: refuse what cannot be
            if W_0 is None:
                raise TypeError(f"{name} matches the targets but is {type(mod).__name__}, not nn.Linear or a "
                                "Conv1D-style layer; pass target_modules that exclude it")
            unfit = _unfit(model, name, mod)
            problem = unfit or (f"in {inside[0]}, which trains in full" if inside else
                                f"tied to {', '.join(tied)}" if tied else None)
            if problem:
                raise (TypeError if unfit else ValueError)(
                    f"{name} matches the targets but is {problem}; exclude it from target_modules")
        else:  # not named
            continue
        _check_weight(W_0, f" for layer {name}")
        _check_rank(rank, *W_0.shape, f" for layer {name}")
        selected.append(name)
    if not selected:
        raise ValueError("the model has no nn.Linear or Conv1D-style layer to adapt"
                         + (f"; skipped: {'; '.join(skipped)}" if skipped else ""))
    meta = [name for name in selected if _base_weight(model.get_submodule(name)).is_meta]
    if meta and not all(p.is_meta for p in model.parameters()):
        raise ValueError(f"{len(meta)} of the {len(selected)} layers to adapt have their weights on the meta "
                         f"device (offloaded, or never loaded): {', '.join(meta[:8])}{', ...' if len(meta) > 8 else ''}. "
                         "Their SVD needs the values: load the model fully first (no disk offload). Nothing was "
                         "changed. A model wholly on meta is adapted for its shapes only")
    if skipped:
        warnings.warn(f"apply_sorsa adapted every linear layer but {'; '.join(skipped)}", stacklevel=3)
    return selected


def _group_adapter_state(state, source):
    """({layer name: {key: tensor}}, {module trained in full: its state dict}) from a flat adapter
    state dict, checking every key."""
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source}: an adapter state must be a non-empty dict from adapter_state_dict()")
    layers, full = {}, {}
    for full_key, tensor in state.items():
        module, marker, rest = str(full_key).partition(f".{FULL}.")
        name, _, key = str(full_key).rpartition(".")
        if not isinstance(tensor, torch.Tensor) or not (marker and module and rest or key in ADAPTER_KEYS and name):
            raise ValueError(f"{source}: unexpected entry {full_key!r}; keys end in one of {ADAPTER_KEYS}, "
                             f"or are '{{module}}.{FULL}.{{key}}'")
        if marker:
            full.setdefault(module, {})[rest] = tensor
        else:
            layers.setdefault(name, {})[key] = tensor
    for name, parts in layers.items():
        missing = [k for k in ADAPTER_KEYS if k not in parts]
        if missing:
            raise ValueError(f"{source}: layer {name} lacks {', '.join(missing)}")
    return layers, full


def _submodule(model, name, source):
    """model.<name>, or a ValueError saying the adapter does not fit this model."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"{source} has layer {name}, which this model lacks; is it the right base model?") from None


def _check_adapter_layer(model, name, parts, source):
    """Raise unless model.<name> is a layer computing x W^T + b that the adapter's factors fit."""
    mod = _submodule(model, name, source)
    if _base_weight(mod) is None or _unfit(model, name, mod):
        raise TypeError(f"{source} targets {name}, which is {type(mod).__name__}, not a layer computing "
                        "x W^T + b (nn.Linear or Conv1D-style) that its parent calls")
    m, n = _base_weight(mod).shape
    r = parts["S_p"].shape[0] if parts["S_p"].dim() == 1 else -1
    shape_of = {"U_p": (m, r), "S_p": (r,), "Vt_p": (r, n)}  # the initial U_p0, S_p0, Vt_p0 alike
    for key in ADAPTER_KEYS:
        expected = shape_of[key.removesuffix("0")]
        if tuple(parts[key].shape) != expected:
            raise ValueError(f"{source}: tensor {name}.{key} has shape {tuple(parts[key].shape)} but layer {name} "
                             f"is {m}x{n} (out x in) at rank {r}, which needs {expected}; is it the right base model?")
    _check_rank(r, m, n, f" for layer {name} in {source}")
    for key in ADAPTER_KEYS:
        if not parts[key].is_floating_point() or not torch.isfinite(parts[key]).all():
            raise ValueError(f"{source}: tensor {name}.{key} is not finite floating point data")


def _check_base(W_0, parts, where):
    """Raise unless W_0 (m, n) is the weight the adapter was made from: its initial factors are W_0's top-r
    singular triplets, so ||U_p0^T W_0 V_p0 - diag(S_p0)||_F / ||S_p0|| is ~0 there and ~1 elsewhere."""
    if W_0.is_meta:
        return
    cd = _exact_dtype(W_0.dtype, parts["U_p0"].dtype)
    U0, S0, Vt0 = (parts[k].to(W_0.device, cd) for k in ("U_p0", "S_p0", "Vt_p0"))
    with torch.no_grad(), _full_float32():
        projected = (U0.mT @ W_0.to(cd)) @ Vt0.mT  # (r, r): diag(S_p0) for the right base
        error = (torch.linalg.matrix_norm(projected - torch.diag(S0)) / torch.linalg.vector_norm(S0)).item()
    if not error <= BASE_TOLERANCE:
        raise ValueError(f"{where} does not hold the weight the adapter was made from: ||U_p0^T W_0 V_p0 - "
                         f"diag(S_p0)||_F / ||S_p0|| = {error:.3g}, above {BASE_TOLERANCE} (the same base in bf16 "
                         "gives ~1e-3). Is it the right base model? Nothing was changed; load_adapter(..., "
                         "check_base=False) puts it on a different base deliberately")


def _check_full_module(model, name, parts, source):
    """Raise unless model.<name> has exactly the saved state's keys and shapes (a module trained in full)."""
    own = _submodule(model, name, source).state_dict()
    if own.keys() != parts.keys() or any(own[k].shape != parts[k].shape for k in own):
        raise ValueError(f"{source}: module {name}, trained in full, has keys and shapes "
                         f"{ {k: tuple(v.shape) for k, v in parts.items()} } but this model's is "
                         f"{ {k: tuple(v.shape) for k, v in own.items()} }; is it the right base model?")


# ----------------------------------------------------------------------------- precision; DDP, FSDP2, torch.compile


def _exact_dtype(*dtypes):
    """The dtype of exact computations: float64 if any of the dtypes is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


@contextlib.contextmanager
def _full_float32():
    """float32 matmuls at full precision inside, whatever the caller set (TF32 on CUDA, bf16
    passes on the CPU's oneDNN: 10- and 8-bit mantissas); the caller's settings come back after."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def unwrap(model):
    """The model inside DistributedDataParallel or torch.compile (FSDP2 shards in place, keeping names)."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return unwrap(model.module)
    if isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
        return unwrap(model._orig_mod)
    return model


def full_tensor(tensor):
    """The whole tensor: an FSDP2 shard (DTensor) gathered from every rank, a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _local_rows(factor):
    """(rows of a (k, r) factor held here, process group to sum their Grams over, or None). FSDP2 shards
    rows by default, so U_p's Gram is the sum of the ranks'; Vt_p^T, split by columns unless Vt_p is sharded
    on dim 1 (fsdp_shard_placement), is gathered whole."""
    if not isinstance(factor, DTensor):
        return factor, None
    if factor.device_mesh.ndim == 1 and factor.placements == (Shard(0),):
        return factor.to_local(), factor.device_mesh.get_group()
    return factor.full_tensor(), None


def _sum_over_ranks(gram, group):
    """The sum over ranks of the local (L, r, r) Grams, in place: one all-reduce of r x r matrices,
    never an all-gather of the factors. group None (one process): gram as it is."""
    if group is not None:
        dist.all_reduce(gram, group=group)
    return gram


def fsdp_shard_placement(model, world_size=None):
    """A shard_placement_fn for fully_shard(m, shard_placement_fn=...): Vt_p and Vt_p0 by columns (dim 1),
    so that the regularizer needs only r x r all-reduces, where the world size (default:
    torch.distributed's) divides their width n (FSDP2 shards other dims only evenly); every other tensor
    by rows. The regularizer is correct either way: a Vt_p held by rows is gathered whole."""
    world = world_size or dist.get_world_size()
    by_columns = {id(p) for _, mod in sorsa_modules(model) for p in (mod.Vt_p, mod.Vt_p0) if p.shape[1] % world == 0}
    return lambda param: Shard(1) if id(param) in by_columns else None


def _rank_0_writes(write, path):
    """write() in one process; under torch.distributed, on rank 0 alone, and every rank returns once it
    has finished: broadcasting its outcome is the barrier, and rank 0's failure raises on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return write()
    error = None
    if dist.get_rank() == 0:
        try:
            write()
        except Exception as err:
            error = err
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 could not write {path}: {outcome[0]}")
