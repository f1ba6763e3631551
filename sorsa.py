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

Map of the file: the method (svd_split -> SORSALinear -> orthonormal_regularizer, sorsa_loss
or add_regularizer_grad, cosine_schedule); the model-level verbs (apply_sorsa, merge_sorsa,
adapters, LoRA and PEFT export); the analysis metrics (delta_sigma, delta_d); the checks; the
glue for DDP, FSDP2 and torch.compile.

Precision, as in mixed-precision training: what trains (U_p, S_p, Vt_p and their initial
copies) is stored in float32 whatever the weight's dtype (float64 stays float64); what is
frozen (W_r, the bias) keeps the weight's dtype; the forward computes in the activations'
dtype; the SVD, the residual, the regularizer and the merge are computed in float32 or
wider, with full float32 matmuls even where the caller allows TF32, and cast once. (A bf16
factor would round away every update smaller than 1/256 of its entry: at lr 3e-5 the
singular values never move.)
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


# ----------------------------------------------------------------------------- SVD split


def _wide(*dtypes):
    """float64 if any of the dtypes is float64, else float32: the dtype of exact computations."""
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


def add_principal(W, U_p, S_p, Vt_p, sign):
    """W + sign * U_p diag(S_p) Vt_p, computed wide and cast once to W's dtype: (m, n) -> (m, n).

    sign = -1 gives the residual W_r = W_0 - W_p (Eq. 2), +1 the merged weight W_r + W_p.
    The residual is taken as a difference, not as U_r diag(S_r) V_r^T, so that W_r + W_p
    gives back W_0 to one rounding whatever the accuracy of the factors. The one (m, n)
    temporary is the wide copy of W, into which the product is added in place.
    """
    cd = _wide(W.dtype, U_p.dtype)
    out = W.detach().to(cd, memory_format=torch.contiguous_format, copy=True)  # (m, n), also from a transposed view
    with _full_float32():
        out.addmm_(U_p.to(cd) * S_p.to(cd), Vt_p.to(cd), alpha=sign)  # diag(S_p) as a column scale
    return out.to(W.dtype)


def _sketch_columns(rank):
    """Columns of the random sketch: rank plus max(rank, 10) extra, so that the top-rank
    singular values come out accurate (oversampling)."""
    return rank + max(rank, 10)


def _randomized_svd(W, rank, niter):
    """Top-`rank` SVD of W (m, n) by a seeded randomized range finder with `niter` power iterations.

    Each power iteration sharpens a decaying spectrum further. The sketch is drawn from
    a generator seeded with 0, so one weight always gives one split.
    """
    m, n = W.shape
    l = _sketch_columns(rank)  # < min(m, n): _top_triplets takes the exact SVD otherwise
    gen = torch.Generator(device=W.device).manual_seed(0)
    omega = torch.randn(n, l, generator=gen, device=W.device, dtype=W.dtype)  # (n, l)
    Q = torch.linalg.qr(W @ omega).Q  # (m, l): orthonormal basis of the sketched range
    for _ in range(niter):  # QR between products keeps the basis well conditioned
        Q = torch.linalg.qr(W.T @ Q).Q  # (n, l)
        Q = torch.linalg.qr(W @ Q).Q  # (m, l)
    U_small, S, Vt = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (l, l), (l,), (l, n)
    return (Q @ U_small)[:, :rank], S[:rank], Vt[:rank]  # (m, r), (r,), (r, n)


def _top_triplets(weight, rank, niter):
    """U_p (m, r), S_p (r,), Vt_p (r, n) of the weight, in float32 or float64 (bf16 and fp16
    SVDs are unsupported or far too inaccurate). Returning frees the wide copy, U and V^T."""
    W = weight.detach().to(_wide(weight.dtype))  # (m, n), upcast by assignment
    if niter is not None and _sketch_columns(rank) < min(W.shape):
        U_p, S_p, Vt_p = _randomized_svd(W, rank, niter)
    else:
        U, S, Vt = torch.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
        U_p, S_p, Vt_p = U[:, :rank], S[:rank], Vt[:rank]
    return _orthonormal(U_p), S_p, _orthonormal(Vt_p.mT).mT


def _orthonormal(F):
    """F (k, r) with orthonormal columns to its dtype's rounding. A float32 SVD's singular vectors
    are orthonormal only to its backward error, about 100 times their rounding (docs/precision.md);
    one float64 QR moves each entry by about that much and leaves them orthonormal. W_r absorbs the move."""
    Q, R = torch.linalg.qr(F.double())  # (k, r), (r, r) with a diagonal of ~+-1
    return (Q * torch.where(torch.diagonal(R) < 0, -1.0, 1.0)).to(F.dtype)  # signs kept: each column stays itself


def svd_split(weight, rank, niter=None, factor_dtype=None):
    """Split W_0 (m, n) into U_p (m, r), S_p (r,), Vt_p (r, n) and W_r (m, n) (Eqs. 1-2).

    niter=None: exact SVD. An int: randomized SVD with that many power iterations, much
    faster for large weights and approximate top singular triplets (docs/performance.md measures
    both); W_r makes the layer exact either way. The factors come back in
    factor_dtype (default: float32, float64 for a float64 weight), W_r in the weight's
    dtype. On the meta device only shapes exist: empty meta tensors come back.
    """
    _check_weight(weight)
    m, n = weight.shape
    _check_rank(rank, m, n)
    _check_niter(niter)
    factor_dtype = _check_factor_dtype(factor_dtype) or _wide(weight.dtype)
    if weight.is_meta:
        return (torch.empty(m, rank, device="meta", dtype=factor_dtype), torch.empty(rank, device="meta", dtype=factor_dtype),
                torch.empty(rank, n, device="meta", dtype=factor_dtype), torch.empty_like(weight))
    with torch.no_grad(), _full_float32():  # the sketch's products too
        U_p, S_p, Vt_p = (t.to(factor_dtype, memory_format=torch.contiguous_format, copy=True)
                          for t in _top_triplets(weight, rank, niter))
        # W_r from the stored factors, so that a narrow factor_dtype's rounding goes into W_r.
        return U_p, S_p, Vt_p, add_principal(weight, U_p, S_p, Vt_p, -1)


# ----------------------------------------------------------------------------- the layer


def _base_weight(layer):
    """W_0 (out, in) of a layer SORSA replaces, or None: an nn.Linear's weight (subclasses too, such
    as Falcon's FalconLinear), or a Conv1D-style layer's transposed (transformers' Conv1D, as in GPT-2:
    attribute nf, weight (in, out) = (nx, nf), y = x W + b; recognized by name and shape, without
    importing transformers)."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    weight = getattr(layer, "weight", None)
    conv1d = type(layer).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
    return weight.mT if conv1d and weight.shape[1] == getattr(layer, "nf", None) else None


class SORSALinear(nn.Module):
    """y = x W_r^T + ((x Vt_p^T) * S_p) U_p^T + b (Eq. 3); x (..., n) -> y (..., m). Eq. 15 as
    written, x W_r + x (U_p * S_p) V_p^T, still builds the (m, n) product; this order never does.

    Trainable: U_p (m, r), S_p (r,), Vt_p (r, n), that is r (m + n + 1) numbers.
    Frozen, as nn.Parameters with requires_grad=False (as a frozen nn.Linear's weight, so
    that DDP does not broadcast them and FSDP shards them): the residual W_r (m, n), the
    bias, and a copy of the initial factors U_p0, S_p0, Vt_p0, so that the learned change
    W_p,t - W_p,0 can be exported. State-dict keys, in order: U_p, S_p, Vt_p, W_r, U_p0,
    S_p0, Vt_p0, bias. Built ready to train, normally through `SORSALinear.from_linear`.
    base_type is the class of the layer it replaced (nn.Linear or a subclass, or a Conv1D-style class
    whose weight is stored (in, out)); merge() gives one back. `.weight` is W_r, for code that reads it.
    """

    def __init__(self, U_p, S_p, Vt_p, W_r, bias=None, base_type=nn.Linear):
        super().__init__()
        (m, r), n = U_p.shape, W_r.shape[1]
        if S_p.shape != (r,) or Vt_p.shape != (r, n) or W_r.shape != (m, n):
            raise ValueError(
                f"inconsistent SORSA shapes: U_p {tuple(U_p.shape)}, S_p {tuple(S_p.shape)}, "
                f"Vt_p {tuple(Vt_p.shape)}, W_r {tuple(W_r.shape)}; expected (m, r), (r,), (r, n), (m, n)"
            )
        self.in_features, self.out_features, self.rank, self.base_type = n, m, r, base_type
        self.U_p, self.S_p, self.Vt_p = (nn.Parameter(t.detach().clone()) for t in (U_p, S_p, Vt_p))
        self.W_r = nn.Parameter(W_r.detach(), requires_grad=False)  # (m, n), not copied: as large as the weight
        self.U_p0, self.S_p0, self.Vt_p0 = (nn.Parameter(t.detach().clone(), requires_grad=False)
                                            for t in (U_p, S_p, Vt_p))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, rank, niter=None, factor_dtype=None):
        """A ready SORSA layer whose output equals `linear`'s (Eq. 3 at t = 0). `linear` is an
        nn.Linear or a Conv1D-style layer (GPT-2's: weight (in, out), y = x W + b), split as W_0 = weight^T."""
        W_0 = _base_weight(linear)
        if W_0 is None:
            raise TypeError(f"from_linear needs an nn.Linear or a Conv1D-style layer (transformers' Conv1D: "
                            f"attribute nf, weight (in, out)), got {type(linear).__name__}")
        return cls(*svd_split(W_0, rank, niter, factor_dtype), linear.bias, type(linear))

    @property
    def weight(self):
        """The frozen residual W_r in the replaced layer's layout: (m, n), or (n, m) for Conv1D. For
        code that reads a layer's weight for its dtype, device or shape (T5's feed-forward casts its
        input to wo.weight.dtype), as PEFT answers with its base layer's weight. It is not the
        effective weight W_r + W_p: merge() builds that, and nothing in this file reads .weight."""
        return self.W_r if issubclass(self.base_type, nn.Linear) else self.W_r.mT

    def forward(self, x):
        # Never builds the (m, n) matrix W_p: the adapter costs r (m + n) multiply-adds per
        # token, like LoRA, instead of m n r per call to form U_p diag(S_p) Vt_p. The float32
        # factors are cast to the activations' dtype (bf16 activations: bf16 matmuls); their
        # gradients come back through the cast in float32.
        low = F.linear(x, self.Vt_p.to(x.dtype))  # (..., r)
        low = low * self.S_p.to(low.dtype)  # diag(S_p) as an elementwise scale
        return F.linear(x, self.W_r, self.bias) + F.linear(low, self.U_p.to(low.dtype))  # (..., m)

    def merge(self):
        """A frozen layer of the replaced type, weight W_r + U_p diag(S_p) Vt_p in its own layout: no
        inference latency, and the original model's state-dict keys and shapes. An nn.Linear subclass
        comes back as itself where it keeps nn.Linear's constructor (FalconLinear), else as nn.Linear;
        a Conv1D-style layer is built as base_type(nf, nx), transformers' signature."""
        # full_tensor: the tensor itself in one process; under FSDP2, the shards gathered.
        W_r, U_p, S_p, Vt_p = (full_tensor(t) for t in (self.W_r, self.U_p, self.S_p, self.Vt_p))
        W = add_principal(W_r, U_p, S_p, Vt_p, +1)  # (m, n)
        linear = issubclass(self.base_type, nn.Linear)
        with torch.device("meta"):  # shapes only: no random initialization to overwrite
            if linear:
                cls = self.base_type if self.base_type.__init__ is nn.Linear.__init__ else nn.Linear
                layer = cls(self.in_features, self.out_features, bias=self.bias is not None)
            else:
                layer = self.base_type(self.out_features, self.in_features)
        layer = layer.to(W.dtype).to_empty(device=W.device)
        with torch.no_grad():
            layer.weight.copy_(W if linear else W.mT)
            if self.bias is not None:
                layer.bias.copy_(full_tensor(self.bias))
        return layer.requires_grad_(False)

    def extra_repr(self):
        layout = "" if self.base_type is nn.Linear else f", replacing {self.base_type.__name__}"
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{layout}"


# ----------------------------------------------------------------------------- regularizer and Eq. 6


class _GramDistance(torch.autograd.Function):
    """Eq. 4's term per layer, ||F^T F - I||_F (squared=True: its square), for factors stacked as
    F (L, k, r) -> (L,), with its gradient written out (A = F^T F - I, symmetric):

        d ||A||_F / dF = 2 F A / ||A||_F        d ||A||_F^2 / dF = 4 F A

    At exact orthonormality (A = 0) the norm has no gradient and the subgradient 0 is taken.
    Forward and backward both run at full float32 (or float64), with autocast off: left to
    autograd, the backward's products would run later, at whatever precision the caller set.
    group: under FSDP2, the ranks holding F's other rows; F^T F is then the sum of their Grams
    and each rank's rows get 2 F_local A / ||A||_F, with no communication in the backward.
    """

    @staticmethod
    def forward(ctx, F, squared, group):
        with torch.autocast(F.device.type, enabled=False), _full_float32():
            # One process: F^T F. FSDP2: the sum of the ranks' Grams of their rows (one all-reduce).
            A = _sum_over_ranks(F.mT @ F, group) - torch.eye(F.shape[-1], device=F.device, dtype=F.dtype)  # (L, r, r)
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


def orthonormal_regularizer(model_or_modules, squared=False, reduction="mean"):
    """L_reg: Eq. 4, ||U_p^T U_p - I||_F + ||Vt_p Vt_p^T - I||_F, for every layer; a scalar.

    reduction="mean" (default) divides the sum of the 2 L norms of L layers by 2 L, as the
    authors' code does: the paper's gamma was tuned on that scale, so it keeps its meaning
    whatever the number of layers (docs/gamma.md: nominal 4e-4, effective 6.25e-6 at lr_max = 3e-5).
    reduction="sum" adds Eq. 4 over the layers as Eq. 5 is written: 2 L times the mean, the
    same gradient direction.

    Read it per layer as Eq. 4; it is computed per factor shape: each layer's U_p (m, r)
    and Vt_p^T (n, r) is a matrix F whose Gram matrix F^T F should be I, and all the F of
    one shape are stacked so that one batched product and one batched norm serve them all
    (a handful of kernels per shape instead of ~25 per layer). Value and gradient are computed
    in full float32 or wider (_GramDistance): bf16 Grams are hundreds of times too large at
    initialization. squared=True sums the squared norms instead; unlike the paper's norm, its
    gradient vanishes at orthonormality, so gradient descent settles there (see theory/).
    """
    _check_model_type(model_or_modules, "model_or_modules")
    _check_reduction(reduction)
    found = _require_adapters(model_or_modules)
    groups = {}  # (shape, dtype, device, process group) -> factors viewed as (k, r), in module order
    for _, mod in found:
        for factor in (mod.U_p, mod.Vt_p.mT):
            # (factor, None) in one process; under FSDP2, the rows this rank holds and its group.
            local, group = _local_rows(factor)  # keyed by the whole shape: every rank forms the same groups
            groups.setdefault((factor.shape, local.dtype, local.device, group), []).append(local)
    total = None
    for (_, dtype, _, group), factors in groups.items():
        stacked = torch.stack(factors).to(_wide(dtype))  # (L, k, r)
        term = _GramDistance.apply(stacked, squared, group).sum()  # Eq. 4, one norm per layer
        total = term if total is None else total + term.to(total.device)
    return total / (2 * len(found)) if reduction == "mean" else total


def sorsa_loss(train_loss, model, gamma, lr_max, squared=False, reduction="mean"):
    """L_train + (gamma / lr_max) L_reg: the loss whose gradient step is Eq. 6.

    A step of size eta_t on this loss is W_p - eta_t grad L_train - gamma_t grad L_reg with
    gamma_t = gamma * eta_t / lr_max, i.e. Eq. 5 with the regularizer's rate following the
    same schedule: one optimizer and one scheduler drive both terms. For plain SGD this is
    exact; adaptive optimizers (AdamW) rescale the summed gradient, as in the paper.

        loss = sorsa_loss(task_loss, model, gamma=6.25e-6, lr_max=3e-5)  # the paper's effective weight
        loss.backward(); clip_grad_norm_(params, 1.0); optimizer.step(); scheduler.step()

    Clipping after this backward scales both terms together; the authors' trainer clips the
    task gradient alone and adds the regularizer's after: add_regularizer_grad.
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
    """Add the gradient of (gamma / lr_max) L_reg to the factors' .grad (Eq. 6's second term);
    return L_reg, detached. The authors' order: the task gradient is clipped, the regularizer's not.

        task_loss.backward(); clip_grad_norm_(params, 1.0)
        add_regularizer_grad(model, gamma=6.25e-6, lr_max=3e-5); optimizer.step(); scheduler.step()

    With gradient accumulation, call it once per optimizer step, after the last micro-batch:
    nothing divides it by the accumulation count (the authors' trainer did, which made their
    nominal gamma 4e-4 an effective 6.25e-6 at 64 steps; docs/gamma.md).
    Under DDP its gradient is not all-reduced, and need not be: every rank holds the same factors.
    """
    _check_model_type(model, "model")
    _check_gamma(gamma, lr_max)
    reg = orthonormal_regularizer(model, squared, reduction)
    if gamma > 0:
        ((gamma / lr_max) * reg).backward()
    return reg.detach()


def cosine_schedule(optimizer, total_steps, warmup_ratio=0.03):
    """The paper's schedule (App. B): linear warm-up over 3% of the steps, then cosine decay to 0.

    Its peak is the optimizer's lr, which is the lr_max that sorsa_loss needs.
    """
    warmup = max(1, round(warmup_ratio * total_steps))

    def factor(step):  # multiplies the optimizer's lr at `step`
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ----------------------------------------------------------------------------- model-level verbs


def sorsa_modules(model):
    """(name, SORSALinear) pairs of a model (wrappers seen through), or of an iterable of layers."""
    if isinstance(model, nn.Module):
        return [(name, mod) for name, mod in unwrap(model).named_modules() if isinstance(mod, SORSALinear)]
    layers = list(model)
    bad = [type(mod).__name__ for mod in layers if not isinstance(mod, SORSALinear)]
    if bad:
        raise TypeError(f"expected a model or SORSALinear layers, got {', '.join(sorted(set(bad)))}")
    return [(str(i), mod) for i, mod in enumerate(layers)]


def _convert(model, builders, full):
    """Swap in one new layer at a time ({name: build()}), so that at most one extra layer's
    weight exists at once. An unexpected failure (out of memory, KeyboardInterrupt) leaves
    every layer either wholly original or wholly SORSA; its message lists the converted ones.
    Then the modules of `full` ({name: state dict to load, or None}) are marked to train in full."""
    done = []
    try:
        for name, build in builders.items():
            model.set_submodule(name, build())
            done.append(name)
    except BaseException as err:
        err.add_note(f"SORSA: {len(done)} of {len(builders)} layers were converted before this error: "
                     f"{', '.join(done) or 'none'}. Each layer is wholly original or wholly SORSA; "
                     "merge_sorsa(model) turns the converted ones back into nn.Linear")
        raise
    for name, state in full.items():
        mod = model.get_submodule(name)
        if state is not None:
            mod.load_state_dict(state)
        mod.sorsa_trains_in_full = True
    _freeze_all_but_adapters(model)
    return list(builders)


def _freeze_all_but_adapters(model):
    """requires_grad only for the U_p, S_p, Vt_p of every SORSA layer and the modules that train in full."""
    model.requires_grad_(False)
    for _, mod in sorsa_modules(model):
        for p in (mod.U_p, mod.S_p, mod.Vt_p):
            p.requires_grad_(True)
    for _, mod in full_modules(model):
        mod.requires_grad_(True)


def full_modules(model):
    """(name, module) pairs of the modules that train in full beside the adapters (modules_to_save)."""
    return [(name, mod) for name, mod in unwrap(model).named_modules() if getattr(mod, "sorsa_trains_in_full", False)]


def apply_sorsa(model, rank, target_modules=None, niter=None, factor_dtype=None, modules_to_save=None):
    """Replace matching linear layers by SORSA layers in place, freeze the rest; return their names.

    target_modules: None (or "all-linear") for every layer computing x W^T + b (nn.Linear, its
    subclasses that do, Conv1D-style layers) but the output head (lm_head, get_output_embeddings()),
    tied weights, layers with fewer outputs than the rank (a classification head) and
    nn.MultiheadAttention's out_proj, which are skipped with a warning naming them; or names such
    as ["q_proj", "v_proj"] matched against the end of each module name, each of which must
    match, every layer matched must be adaptable. niter: see svd_split.
    factor_dtype: the trainable factors' dtype (default float32; float64 for float64 weights).
    modules_to_save: names of modules that train in full and travel with the adapter (a new
    classification head: ["classifier"]), as PEFT's option of that name.
    Every target is checked before the first layer is touched, so bad input leaves the
    model as it was; layers are then converted one at a time (peak memory: one layer).
    """
    model = _check_unwrapped_module(model, "apply_sorsa")
    _check_rank_type(rank)
    _check_niter(niter)
    _check_factor_dtype(factor_dtype)
    full = _select_full(model, modules_to_save)
    names = _select_targets(model, rank, _normalize_targets(target_modules), full)
    return _convert(model, {name: lambda name=name: SORSALinear.from_linear(
        model.get_submodule(name), rank, niter, factor_dtype) for name in names}, dict.fromkeys(full))


def merge_sorsa(model):
    """Replace every SORSA layer in place by its merge(), a layer of the type it replaced; return the names."""
    found = _require_adapters(model)
    _check_finite_factors(found, "merge_sorsa merged nothing")
    inner = unwrap(model)
    for name, mod in found:  # one layer at a time: one extra layer's weight at most
        inner.set_submodule(name, mod.merge())
    return [name for name, _ in found]


def adapter_state_dict(model):
    """The trained factors and the initial ones, per layer: '{name}.U_p', ..., '{name}.Vt_p0';
    and the whole state of each module that trains in full: '{name}.modules_to_save.{key}'.

    With both factors, the learned change W_p,t - W_p,0 can be applied to the original base
    model (whose weight is W_r + W_p,0) without its W_r and without a new SVD. The tensors
    are copies on the CPU (FSDP2 shards gathered: call it on every rank).
    """
    found = _require_adapters(model)
    _check_finite_factors(found, "no adapter state was made")
    state = {f"{name}.{key}": getattr(mod, key) for name, mod in found for key in ADAPTER_KEYS}
    state.update({f"{name}.{FULL}.{key}": t for name, mod in full_modules(model) for key, t in mod.state_dict().items()})
    return {key: full_tensor(t).detach().to("cpu", copy=True) for key, t in state.items()}


def save_adapter(model, path):
    """Write adapter_state_dict(model) to `path` atomically, with a checksum (save_checked).
    Under torch.distributed, call it on every rank: rank 0 writes, and every rank returns once
    the file is complete (loading it right after is safe)."""
    state = adapter_state_dict(model)  # every rank: FSDP2's shards are gathered
    _rank_0_writes(lambda: save_checked(state, path), path)


def load_adapter(model, state, factor_dtype=None, check_base=True):
    """Put a saved adapter (a dict or a file path) onto the original base model; return the names.

    Each target nn.Linear or Conv1D-style layer (W_0) becomes a SORSA layer with W_r = W_0 - W_p,0
    and the trained U_p, S_p, Vt_p, so its weight is W_0 + (W_p,t - W_p,0). No SVD is computed;
    modules that trained in full get their saved state. check_base: refuse a base other than the
    one the adapter was made from, whose top-r singular triplets the initial factors are
    (U_p0^T W_0 V_p0 = diag(S_p0); an m n r product per layer); False loads onto any base that fits.
    Everything is checked before the model is touched; layers are converted one at a time.
    """
    model = _check_unwrapped_module(model, "load_adapter")
    _check_factor_dtype(factor_dtype)
    source, state = _read_adapter(state)
    layers, full = _group_adapter_state(state, source)
    if sorsa_modules(model):
        raise ValueError("the model already has SORSA adapters; load an adapter onto the base model")
    read_directly = _read_directly(model)
    for name, parts in layers.items():
        _check_adapter_layer(model, name, parts, source, read_directly)
        if check_base:
            _check_base(_base_weight(model.get_submodule(name)), parts, f"{source}: layer {name}")
    for name, parts in full.items():
        _check_full_module(model, name, parts, source)

    def build(name, parts):
        base = model.get_submodule(name)
        W_0 = _base_weight(base)
        p = {k: v.to(device=W_0.device, dtype=factor_dtype or _wide(W_0.dtype)) for k, v in parts.items()}
        layer = SORSALinear(p["U_p0"], p["S_p0"], p["Vt_p0"], add_principal(W_0, p["U_p0"], p["S_p0"], p["Vt_p0"], -1),
                            base.bias, type(base))
        with torch.no_grad():
            for key in ("U_p", "S_p", "Vt_p"):
                getattr(layer, key).copy_(p[key])
        return layer

    return _convert(model, {name: lambda name=name, parts=parts: build(name, parts) for name, parts in layers.items()},
                    full)


def lora_state_dict(model):
    """The learned change as plain LoRA factors: '{name}.lora_A.weight' (2r, n), '.lora_B.weight' (m, 2r).

    B @ A = U_p,t diag(S_p,t) Vt_p,t - U_p,0 diag(S_p,0) Vt_p,0 = W_p,t - W_p,0, a rank-2r
    product that any LoRA loader can add to the original base weight with scaling 1. A module
    trained in full comes whole, '{name}.{key}', to replace the base model's.
    """
    state = adapter_state_dict(model)
    out = {k.replace(f".{FULL}.", "."): v for k, v in state.items() if f".{FULL}." in k}
    for name, mod in sorsa_modules(model):
        U, S, Vt, U0, S0, Vt0 = (state[f"{name}.{key}"] for key in ADAPTER_KEYS)
        out[f"{name}.lora_A.weight"] = torch.cat([Vt, Vt0], dim=0)  # (2r, n)
        out[f"{name}.lora_B.weight"] = torch.cat([U * S, -U0 * S0], dim=1)  # (m, 2r)
    return out


def save_lora(model, directory, base_name=None):
    """Write the learned change as a PEFT LoRA adapter: PeftModel.from_pretrained(base, directory).

    directory/adapter_model.bin holds lora_state_dict(model) under PEFT's key names
    ('base_model.model.{name}.lora_A.weight'), written with torch.save, which PEFT reads
    without safetensors; directory/adapter_config.json says LoRA with r = lora_alpha = 2
    * rank (scaling 1), the adapted layers as target_modules, no dropout, and fan_in_fan_out
    when they replaced Conv1D-style layers (GPT-2; the LoRA factors are the same either way:
    PEFT transposes B A for those). Modules trained in full go to PEFT's modules_to_save, their
    state under 'base_model.model.{name}.{key}'. Each file is written atomically (every rank: see
    save_adapter); base_name goes to base_model_name_or_path.
    """
    lora = lora_state_dict(model)
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
    weights = {f"base_model.model.{k}": v for k, v in lora.items()}

    def write():
        os.makedirs(directory, exist_ok=True)
        write_atomically(os.path.join(directory, "adapter_model.bin"), lambda f: torch.save(weights, f))
        write_atomically(os.path.join(directory, "adapter_config.json"),
                         lambda f: f.write(json.dumps(config, indent=2).encode()))
    _rank_0_writes(write, directory)


def write_atomically(path, write):
    """Call write(file) on a new temporary file beside `path`, flush it to disk, then rename it:
    `path` holds the old content or the new, never half of it. The file gets the mode a plain
    open() would give (0666 less the umask), so that other users and services can read it."""
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


def _rank_0_writes(write, path):
    """write() in one process; under torch.distributed, write() on rank 0 alone, and every rank
    returns once it has finished: broadcasting its outcome is the barrier, and a failure on rank 0
    raises on every rank instead of leaving the others waiting."""
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


def _sha256(tensors):
    """SHA-256 of the names, dtypes, shapes and bytes of a dict of tensors."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()  # host memory, one block
        h.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode())
        # Its bytes, any dtype (bf16 too). A uint8 view's .numpy() would read them without a copy,
        # but needs numpy, which torch does not install: sorsa.py needs only torch.
        h.update(ctypes.string_at(t.data_ptr(), t.nbytes))
    return h.hexdigest()


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


# ----------------------------------------------------------------------------- analysis (Section 4)


def _svd64(W_0, W_t):
    """SVDs of two same-shape weights in float64 on the CPU, as the paper advises (App. B.1)."""
    tensors = isinstance(W_0, torch.Tensor) and isinstance(W_t, torch.Tensor)
    if not tensors or W_0.dim() != 2 or W_0.shape != W_t.shape:
        raise ValueError(
            f"delta_sigma/delta_d need two 2-D weights of one shape, got "
            f"{tuple(getattr(W_0, 'shape', ()))} and {tuple(getattr(W_t, 'shape', ()))}"
        )
    return [torch.linalg.svd(W.detach().to("cpu", torch.float64), full_matrices=False) for W in (W_0, W_t)]


def delta_sigma(W_0, W_t):
    """Eq. 7: mean absolute change of the k = min(m, n) singular values, (m, n), (m, n) -> float."""
    (_, S_0, _), (_, S_t, _) = _svd64(W_0, W_t)
    return (S_t - S_0).abs().mean().item()


def delta_d(W_0, W_t):
    """Eqs. 8-10: 1 - mean |cosine| between matching singular vectors, (m, n), (m, n) -> float in [0, 1].

    Singular vectors are matched by rank order, so the value is meaningful only where
    singular values are distinct; the absolute value removes the SVD's sign ambiguity.
    """
    (U_0, _, Vt_0), (U_t, _, Vt_t) = _svd64(W_0, W_t)
    dU = (U_t * U_0).sum(dim=0).abs()  # (k,) Eq. 8: |<u_t^i, u_0^i>|
    dV = (Vt_t * Vt_0).sum(dim=1).abs()  # (k,) Eq. 9: |<v_t^i, v_0^i>|
    return 1.0 - (dU.sum() + dV.sum()).item() / (2 * dU.numel())  # Eq. 10


# ----------------------------------------------------------------------------- checks: bad input fails first


def _describe(value):
    return f"{type(value).__name__} {value!r}" if not isinstance(value, torch.Tensor) else \
        f"a tensor of shape {tuple(value.shape)}"


def _check_rank_type(rank):
    """Raise unless rank is an int (bool excluded)."""
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int, got {type(rank).__name__} {rank!r}")


def _check_rank(rank, m, n, where=""):
    """Raise unless rank is an int in [1, min(m, n)]; `where` names the layer for the message."""
    _check_rank_type(rank)
    if not 1 <= rank <= min(m, n):
        raise ValueError(
            f"rank {rank} is outside [1, min(out, in)] = [1, {min(m, n)}]{where}; "
            f"choose a rank between 1 and {min(m, n)}"
        )


def _check_niter(niter):
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be None (exact SVD) or an int >= 0, got {niter!r}")


def _check_gamma(gamma, lr_max):
    """Raise unless gamma >= 0 and lr_max > 0 are numbers."""
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
        raise TypeError(
            f"weight{where} has dtype {weight.dtype}; SORSA needs a floating weight "
            "(float32, float64, bfloat16 or float16): dequantize or cast it first"
        )
    if not weight.is_meta and not torch.isfinite(weight).all():
        raise ValueError(f"weight{where} contains NaN or Inf; the SVD of a non-finite matrix is undefined")


def _check_model_type(model, argument):
    """Raise a TypeError unless `model` is an nn.Module or an iterable of SORSALinear layers."""
    if isinstance(model, (torch.Tensor, str, bytes)) or not (isinstance(model, nn.Module) or hasattr(model, "__iter__")):
        raise TypeError(f"{argument} must be an nn.Module or a list of SORSALinear layers, got {_describe(model)}")


def _check_unwrapped_module(model, verb):
    """The model to convert, seen through torch.compile; DDP must come after adapting."""
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
    """sorsa_modules(model), or a ValueError saying how to add adapters first."""
    found = sorsa_modules(model)
    if not found:
        raise ValueError("the model has no SORSA adapters; call apply_sorsa(model, rank) first")
    return found


def _check_finite_factors(found, consequence):
    """Raise, naming the layer and tensor, if a trained factor holds NaN or Inf."""
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


def _output_heads(model):
    """Names of the output head: what model.get_output_embeddings() returns (Hugging Face models),
    and any layer named lm_head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return {name for name, mod in model.named_modules() if mod is head or name.rsplit(".", 1)[-1] == "lm_head"}


def _read_directly(model):
    """Names of the layers whose parent reads their weight instead of calling them (the children of
    nn.MultiheadAttention: its out_proj): a SORSA layer there would be bypassed."""
    return {f"{name}.{child}".lstrip(".") for name, mod in model.named_modules()
            if isinstance(mod, nn.MultiheadAttention) for child, _ in mod.named_children()}


def _computes_linear(layer):
    """Whether a layer computes x W^T + b: true of nn.Linear's own forward; an nn.Linear subclass with
    its own forward (Falcon's FalconLinear) is run on a seeded probe input and compared with F.linear
    (a router or a quantized layer does not match). On the meta device it cannot be told: true."""
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


def _select_targets(model, rank, targets, full=()):
    """Names of the layers to adapt, after checking every one of them and every pattern.

    Adaptable: every layer that computes x W^T + b with its weight (nn.Linear, a subclass that is
    checked to, a Conv1D-style layer) and that its parent calls rather than reading the weight itself
    (nn.MultiheadAttention's out_proj does not). targets None: every adaptable
    layer but the output head, tied weights, layers with fewer outputs than the rank (a classification
    head of a few labels), each named in one warning with why, and layers inside the modules that
    train in full (`full`)."""
    if sorsa_modules(model):
        raise ValueError(
            "the model already has SORSA adapters; adapting twice would split the split. "
            "Call merge_sorsa(model) first, or start from the base model"
        )
    modules = [(name, mod) for name, mod in model.named_modules() if name]
    linears = [name for name, mod in modules if _base_weight(mod) is not None]
    for target in targets or ():
        if not any(_matches(name, target) for name, _ in modules):
            suffixes = {".".join(name.split(".")[i:]) for name in linears for i in range(name.count(".") + 1)}
            near = difflib.get_close_matches(target, suffixes, n=5, cutoff=0.6) or sorted(
                {name.rsplit(".", 1)[-1] for name in linears})[:8]
            raise ValueError(f"target {target!r} matches no layer of the model; nothing was changed. "
                             f"Near names: {', '.join(near) or 'none: the model has no nn.Linear'}")
    owners = {}  # id(parameter) -> every name it is reachable under (tied weights share one)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    heads, read_directly, selected, skipped = _output_heads(model), _read_directly(model), [], []
    for name, mod in modules:
        W_0 = _base_weight(mod)
        if not (any(_matches(name, t) for t in targets) if targets else W_0 is not None):
            continue
        if W_0 is None:
            raise TypeError(f"{name} matches the targets but is {type(mod).__name__}, not nn.Linear or a "
                            "Conv1D-style layer; pass target_modules that exclude it")
        tied = [o for o in owners.get(id(mod.weight), []) if o != f"{name}.weight"]
        inside = [f for f in full if name == f or name.startswith(f + ".")]
        m, n = W_0.shape
        unfit = (f"{type(mod).__name__}, whose weight its parent nn.MultiheadAttention reads directly"
                 if name in read_directly else None if _computes_linear(mod) else
                 f"{type(mod).__name__}, whose forward is not x W^T + b")
        problem = unfit or (f"in {inside[0]}, which trains in full" if inside else
                            "the output head" if targets is None and name in heads else
                            f"tied to {', '.join(tied)}" if tied else
                            f"rank {rank} is above its {m} outputs: a new classification head trains in full "
                            "with modules_to_save" if targets is None and m < rank <= n else None)
        if targets is None:  # every linear layer, but what a default cannot adapt safely
            if inside:  # the caller's choice: nothing to warn about
                continue
            if problem:
                skipped.append(f"{name} ({problem})")
                continue
        elif problem:
            raise (TypeError if unfit else ValueError)(
                f"{name} matches the targets but is {problem}; exclude it from target_modules")
        where = f" for layer {name}"
        _check_weight(W_0, where)
        _check_rank(rank, *W_0.shape, where)
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


def _read_adapter(state):
    """(a name for messages, the adapter dict) from a dict or a save_adapter file."""
    if isinstance(state, dict):
        return "the adapter state", state
    if not isinstance(state, (str, os.PathLike)):
        raise TypeError(f"state must be an adapter dict or a file path, got {_describe(state)}")
    return f"adapter file {state}", load_checked(state)[0]


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


def _check_adapter_layer(model, name, parts, source, read_directly):
    """Raise unless model.<name> is an nn.Linear or Conv1D-style layer the adapter factors fit."""
    mod = _submodule(model, name, source)
    if _base_weight(mod) is None or name in read_directly or not _computes_linear(mod):
        raise TypeError(f"{source} targets {name}, which is {type(mod).__name__}, not a layer computing "
                        "x W^T + b (nn.Linear or Conv1D-style) that its parent calls")
    m, n = _base_weight(mod).shape
    r = parts["S_p"].shape[0] if parts["S_p"].dim() == 1 else -1
    shape_of = {"U_p": (m, r), "S_p": (r,), "Vt_p": (r, n)}  # the initial U_p0, S_p0, Vt_p0 alike
    for key in ADAPTER_KEYS:
        expected = shape_of[key.removesuffix("0")]
        if tuple(parts[key].shape) != expected:
            raise ValueError(
                f"{source}: tensor {name}.{key} has shape {tuple(parts[key].shape)} but layer {name} "
                f"is {m}x{n} (out x in) at rank {r}, which needs {expected}; is it the right base model?"
            )
    _check_rank(r, m, n, f" for layer {name} in {source}")
    for key in ADAPTER_KEYS:
        if not parts[key].is_floating_point() or not torch.isfinite(parts[key]).all():
            raise ValueError(f"{source}: tensor {name}.{key} is not finite floating point data")


def _check_base(W_0, parts, where):
    """Raise unless W_0 (m, n) is the weight the adapter was made from: its initial factors are W_0's
    top-r singular triplets, so ||U_p0^T W_0 V_p0 - diag(S_p0)||_F / ||S_p0|| is ~0 there (bf16
    rounding: ~1e-3) and ~1 for another model's weight of the same shape."""
    if W_0.is_meta:
        return
    cd = _wide(W_0.dtype, parts["U_p0"].dtype)
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


# ----------------------------------------------------------------------------- glue: DDP, FSDP2, torch.compile


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
    """(rows of a (k, r) factor held here, process group to sum their Grams over, or None).

    FSDP2 shards a parameter by rows (dim 0) by default: U_p's rows are then split across
    ranks, and F^T F is the sum of the ranks' local Grams. Vt_p^T is split by columns unless
    Vt_p is sharded on dim 1 (fsdp_shard_placement), so it is gathered whole (an all-gather).
    """
    if not isinstance(factor, DTensor):
        return factor, None
    if factor.device_mesh.ndim == 1 and factor.placements == (Shard(0),):
        return factor.to_local(), factor.device_mesh.get_group()
    return factor.full_tensor(), None


def _sum_over_ranks(gram, group):
    """The sum over ranks of the local (L, r, r) Grams, in place: one all-reduce of r x r
    matrices, never an all-gather of the factors. group None (one process): gram as it is."""
    if group is not None:
        dist.all_reduce(gram, group=group)
    return gram


def fsdp_shard_placement(model, world_size=None):
    """A shard_placement_fn for fully_shard(m, shard_placement_fn=...): Vt_p and Vt_p0 by columns
    (dim 1), so that the regularizer needs only r x r all-reduces, where the world size (default:
    torch.distributed's) divides their width n; FSDP2 shards dims other than 0 only evenly, so
    where it does not (n = 4096 on 3, 6, 12 or 24 ranks), and for every other tensor, rows (the
    default). The regularizer is correct either way: a Vt_p held by rows is gathered whole."""
    world = world_size or dist.get_world_size()
    by_columns = {id(p) for _, mod in sorsa_modules(model) for p in (mod.Vt_p, mod.Vt_p0) if p.shape[1] % world == 0}
    return lambda param: Shard(1) if id(param) in by_columns else None
