"""SORSA: Singular Values and Orthonormal Regularized Singular Vectors Adaptation.

Reference implementation of arXiv:2409.00055, in one file that needs only torch.

The method in ten lines (PyTorch convention: a weight W_0 is (m, n) = (out, in)):

    W_0 = U diag(S) V^T                                   SVD of the pretrained weight
    U_p, S_p, Vt_p = U[:, :r], S[:r], V^T[:r, :]          trainable principal factors   (Eq. 1)
    W_r = W_0 - U_p diag(S_p) Vt_p                        frozen residual                (Eq. 2)
    SORSA(x) = x W_r^T + x (U_p diag(S_p) Vt_p)^T         equals x W_0^T at step 0       (Eq. 3)
    L_reg = ||U_p^T U_p - I||_F + ||Vt_p Vt_p^T - I||_F   orthonormal regularizer        (Eq. 4)
    loss  = L_train + (gamma / lr_max) L_reg              one optimizer, one scheduler   (Eq. 6)
    merge: nn.Linear(weight = W_r + U_p diag(S_p) Vt_p)   no inference latency

PiSSA is the same split with U_p diag(S_p)^(1/2) and diag(S_p)^(1/2) Vt_p trained as
two matrices and no regularizer; SORSA keeps U_p, S_p and Vt_p apart and regularizes.

Map of the file: svd_split -> SORSALinear -> apply_sorsa, orthonormal_regularizer, sorsa_loss,
cosine_schedule, merge_sorsa -> adapter save, load and LoRA export -> delta_sigma, delta_d.

Dtype policy: the SVD runs in float64 for float64 weights and in float32 otherwise
(bf16 and fp16 SVDs are either unsupported or far too inaccurate); every tensor a layer
stores is then cast back, once, to the weight's dtype.
"""

import math
import os
import tempfile

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_KEYS = ("U_p", "S_p", "Vt_p", "U_p0", "S_p0", "Vt_p0")  # per layer, in an adapter file


# ----------------------------------------------------------------------------- SVD split


def _compute_dtype(dtype):
    """The dtype the SVD and the residual are computed in: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def principal_weight(U_p, S_p, Vt_p, dtype):
    """W_p = U_p diag(S_p) Vt_p (Eq. 1), computed in `dtype`: (m, r), (r,), (r, n) -> (m, n)."""
    return (U_p.to(dtype) * S_p.to(dtype)) @ Vt_p.to(dtype)  # (m, n); diag as a column scale


def residual(W_0, U_p, S_p, Vt_p):
    """W_r = W_0 - U_p diag(S_p) Vt_p (Eq. 2), computed wide and cast to W_0's dtype.

    Taken as a difference, not as U_r diag(S_r) V_r^T, so that W_r + W_p gives back W_0
    to one rounding in W_0's dtype whatever the accuracy of the factors.
    """
    cd = _compute_dtype(W_0.dtype)
    return (W_0.to(cd) - principal_weight(U_p, S_p, Vt_p, cd)).to(W_0.dtype)  # (m, n)


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
    l = min(_sketch_columns(rank), m, n)
    gen = torch.Generator(device=W.device).manual_seed(0)
    omega = torch.randn(n, l, generator=gen, device=W.device, dtype=W.dtype)  # (n, l)
    Q = torch.linalg.qr(W @ omega).Q  # (m, l): orthonormal basis of the sketched range
    for _ in range(niter):  # QR between products keeps the basis well conditioned
        Q = torch.linalg.qr(W.T @ Q).Q  # (n, l)
        Q = torch.linalg.qr(W @ Q).Q  # (m, l)
    U_small, S, Vt = torch.linalg.svd(Q.T @ W, full_matrices=False)  # (l, l), (l,), (l, n)
    return (Q @ U_small)[:, :rank], S[:rank], Vt[:rank]  # (m, r), (r,), (r, n)


def svd_split(weight, rank, niter=None):
    """Split W_0 (m, n) into U_p (m, r), S_p (r,), Vt_p (r, n) and W_r (m, n) (Eqs. 1-2).

    niter=None: exact SVD. An int: randomized SVD with that many power iterations,
    much faster for large weights (bench.py: niter=3 is 24x faster at 4096x11008 and keeps
    the top 128 singular values of an LLM-like spectrum within 0.5%). On the meta
    device only shapes exist, so empty meta tensors of the right shapes come back.
    """
    _check_weight(weight)
    m, n = weight.shape
    _check_rank(rank, m, n)
    if niter is not None and (isinstance(niter, bool) or not isinstance(niter, int) or niter < 0):
        raise ValueError(f"niter must be None (exact SVD) or an int >= 0, got {niter!r}")
    if weight.is_meta:
        meta = dict(device="meta", dtype=weight.dtype)
        return (torch.empty(m, rank, **meta), torch.empty(rank, **meta),
                torch.empty(rank, n, **meta), torch.empty(m, n, **meta))
    with torch.no_grad():
        W = weight.detach().to(_compute_dtype(weight.dtype))  # (m, n), upcast by assignment
        if niter is None or _sketch_columns(rank) >= min(m, n):  # sketch as large as W: exact
            U, S, Vt = torch.linalg.svd(W, full_matrices=False)  # (m, k), (k,), (k, n)
            U_p, S_p, Vt_p = U[:, :rank], S[:rank], Vt[:rank]
        else:
            U_p, S_p, Vt_p = _randomized_svd(W, rank, niter)
        # Cast the factors first, then take the residual from the cast factors, so that
        # the rounding of U_p, S_p, Vt_p to a narrow dtype is absorbed into W_r.
        U_p, S_p, Vt_p = (t.to(weight.dtype).contiguous() for t in (U_p, S_p, Vt_p))
        return U_p, S_p, Vt_p, residual(weight.detach(), U_p, S_p, Vt_p)


# ----------------------------------------------------------------------------- the layer


class SORSALinear(nn.Module):
    """y = x W_r^T + ((x Vt_p^T) * S_p) U_p^T + b (Eq. 3, fused as in Eq. 15); x (..., n) -> y (..., m).

    Trainable: U_p (m, r), S_p (r,), Vt_p (r, n), that is r (m + n + 1) numbers.
    Frozen: the residual W_r (m, n), the bias, and a copy of the initial factors
    (U_p0, S_p0, Vt_p0) so that the learned change W_p,t - W_p,0 can be exported.
    Built ready to train from a split, normally through `SORSALinear.from_linear`.
    """

    def __init__(self, U_p, S_p, Vt_p, W_r, bias=None):
        super().__init__()
        (m, r), n = U_p.shape, W_r.shape[1]
        if S_p.shape != (r,) or Vt_p.shape != (r, n) or W_r.shape != (m, n):
            raise ValueError(
                f"inconsistent SORSA shapes: U_p {tuple(U_p.shape)}, S_p {tuple(S_p.shape)}, "
                f"Vt_p {tuple(Vt_p.shape)}, W_r {tuple(W_r.shape)}; expected (m, r), (r,), (r, n), (m, n)"
            )
        self.in_features, self.out_features, self.rank = n, m, r
        self.U_p = nn.Parameter(U_p.detach().clone())  # (m, r)
        self.S_p = nn.Parameter(S_p.detach().clone())  # (r,)
        self.Vt_p = nn.Parameter(Vt_p.detach().clone())  # (r, n)
        # Buffers, not parameters: no optimizer can pick them up, yet they move with .to().
        self.register_buffer("W_r", W_r.detach().clone())  # (m, n)
        self.register_buffer("U_p0", U_p.detach().clone())  # (m, r)
        self.register_buffer("S_p0", S_p.detach().clone())  # (r,)
        self.register_buffer("Vt_p0", Vt_p.detach().clone())  # (r, n)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear, rank, niter=None):
        """A ready SORSA layer whose output equals `linear`'s (Eq. 3 at t = 0)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        U_p, S_p, Vt_p, W_r = svd_split(linear.weight, rank, niter)
        return cls(U_p, S_p, Vt_p, W_r, linear.bias)

    def forward(self, x):
        # Never builds the (m, n) matrix W_p: the adapter costs r (m + n) multiply-adds
        # per token, like LoRA, instead of m n r per call to form U_p diag(S_p) Vt_p.
        low = F.linear(x, self.Vt_p) * self.S_p  # (..., r); diag(S_p) as an elementwise scale
        return F.linear(x, self.W_r, self.bias) + F.linear(low, self.U_p)  # (..., m)

    def merge(self):
        """A plain, frozen nn.Linear with weight W_r + U_p diag(S_p) Vt_p: no inference latency."""
        linear = nn.utils.skip_init(nn.Linear, self.in_features, self.out_features, bias=self.bias is not None,
                                    device=self.W_r.device, dtype=self.W_r.dtype)  # no random init to overwrite
        with torch.no_grad():
            cd = _compute_dtype(self.W_r.dtype)
            W = self.W_r.to(cd) + principal_weight(self.U_p, self.S_p, self.Vt_p, cd)  # (m, n)
            linear.weight.copy_(W)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.requires_grad_(False)
        return linear

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# ----------------------------------------------------------------------------- model-level verbs


def sorsa_modules(model):
    """(name, SORSALinear) pairs of a model, or of an iterable of SORSALinear layers."""
    if isinstance(model, nn.Module):
        return [(name, mod) for name, mod in model.named_modules() if isinstance(mod, SORSALinear)]
    layers = list(model)
    bad = [type(mod).__name__ for mod in layers if not isinstance(mod, SORSALinear)]
    if bad:
        raise TypeError(f"expected a model or SORSALinear layers, got {', '.join(sorted(set(bad)))}")
    return [(str(i), mod) for i, mod in enumerate(layers)]


def _require_adapters(model):
    """sorsa_modules(model), or a ValueError saying how to add adapters first."""
    found = sorsa_modules(model)
    if not found:
        raise ValueError("the model has no SORSA adapters; call apply_sorsa(model, rank) first")
    return found


def _normalize_targets(target_modules):
    """None (every nn.Linear), or a non-empty tuple of name patterns."""
    if target_modules is None:
        return None
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise TypeError(f"target_modules must be None, a name or a list of names, got {target_modules!r}")
    return targets


def _matches(name, targets):
    """A module name matches a pattern if it is the pattern or ends with '.' + pattern."""
    return targets is None or any(name == t or name.endswith("." + t) for t in targets)


def _freeze_all_but_adapters(model):
    """requires_grad only for the U_p, S_p, Vt_p of every SORSA layer."""
    model.requires_grad_(False)
    for _, mod in sorsa_modules(model):
        for p in (mod.U_p, mod.S_p, mod.Vt_p):
            p.requires_grad_(True)


def _replace_all(model, new_modules):
    """Swap in every prepared module (name -> module); nothing is swapped before all are built."""
    for name, module in new_modules.items():
        model.set_submodule(name, module)


def _select_targets(model, rank, targets):
    """Names of the nn.Linear layers to adapt, after checking every one of them."""
    if sorsa_modules(model):
        raise ValueError(
            "the model already has SORSA adapters; adapting twice would split the split. "
            "Call merge_sorsa(model) first, or start from the base model"
        )
    owners = {}  # id(parameter) -> every name it is reachable under (tied weights share one)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    selected = []
    for name, mod in model.named_modules():
        if not name or not _matches(name, targets) or (targets is None and not isinstance(mod, nn.Linear)):
            continue
        where = f" for layer {name}"
        if type(mod) is not nn.Linear:
            raise TypeError(
                f"{name} matches the targets but is {type(mod).__name__}, not nn.Linear; "
                "SORSA replaces plain nn.Linear layers only: pass target_modules that exclude it"
            )
        tied = [o for o in owners[id(mod.weight)] if o != f"{name}.weight"]
        if tied:
            raise ValueError(f"{name}.weight is tied to {', '.join(tied)}; exclude it from target_modules")
        _check_weight(mod.weight, where)
        _check_rank(rank, *mod.weight.shape, where)
        selected.append(name)
    if not selected:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise ValueError(
            f"no nn.Linear layer matches target_modules={list(targets or [])}; "
            f"the model's nn.Linear layers are: {', '.join(linears[:8]) or 'none'}"
            f"{' ...' if len(linears) > 8 else ''}"
        )
    return selected


def apply_sorsa(model, rank, target_modules=None, niter=None):
    """Replace matching nn.Linear layers by SORSA layers in place, freeze the rest; return their names.

    target_modules: None for every nn.Linear, or names such as ["q_proj", "v_proj"] matched
    against the end of each module name. Every target is checked and every new layer is
    built before the first is swapped in, so a bad target leaves the model as it was
    (peak memory is therefore the adapted weights twice).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_sorsa needs an nn.Module, got {type(model).__name__}")
    _check_rank_type(rank)
    names = _select_targets(model, rank, _normalize_targets(target_modules))
    new = {name: SORSALinear.from_linear(model.get_submodule(name), rank, niter) for name in names}
    _replace_all(model, new)
    _freeze_all_but_adapters(model)
    return names


def orthonormal_regularizer(model_or_modules, squared=False):
    """L_reg = sum over layers of ||U_p^T U_p - I||_F + ||Vt_p Vt_p^T - I||_F (Eq. 4); a scalar.

    Always computed in float32 or wider, with autocast off: in bf16 the products U_p^T U_p
    are rounded so coarsely that the value at initialization is hundreds of times too large.
    squared=True sums the squared norms instead; unlike the paper's norm, its gradient
    vanishes at orthonormality, so gradient descent settles instead of oscillating there
    (see theory/). The paper's form is the default.
    """
    total = None
    for _, mod in _require_adapters(model_or_modules):
        cd = _compute_dtype(mod.U_p.dtype)
        with torch.autocast(device_type=mod.U_p.device.type, enabled=False):
            U, Vt = mod.U_p.to(cd), mod.Vt_p.to(cd)  # (m, r), (r, n)
            eye = torch.eye(mod.rank, device=U.device, dtype=cd)  # (r, r)
            for gram in (U.T @ U, Vt @ Vt.T):  # (r, r) each: U_p^T U_p and V_p^T V_p
                term = torch.linalg.matrix_norm(gram - eye)
                term = term.square() if squared else term
                total = term if total is None else total + term.to(total.device)
    return total


def sorsa_loss(train_loss, model, gamma, lr_max, squared=False):
    """L_train + (gamma / lr_max) L_reg: the loss whose gradient step is Eq. 6.

    A step of size eta_t on this loss is W_p - eta_t grad L_train - gamma_t grad L_reg with
    gamma_t = gamma * eta_t / lr_max, i.e. Eq. 5 with the regularizer's rate following the
    same schedule: one optimizer and one scheduler drive both terms. For plain SGD this is
    exact; adaptive optimizers (AdamW) rescale the summed gradient, as in the paper.

        loss = sorsa_loss(task_loss, model, gamma=4e-4, lr_max=3e-5)
        loss.backward(); optimizer.step(); scheduler.step()
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}; gamma = 0 trains SORSA without the regularizer")
    if not lr_max > 0:
        raise ValueError(f"lr_max must be the scheduler's largest learning rate (> 0), got {lr_max}")
    if gamma == 0:
        return train_loss
    return train_loss + (gamma / lr_max) * orthonormal_regularizer(model, squared)


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


def merge_sorsa(model):
    """Replace every SORSA layer by its merged nn.Linear in place; return the merged names."""
    found = _require_adapters(model)
    _replace_all(model, {name: mod.merge() for name, mod in found})
    return [name for name, _ in found]


# ----------------------------------------------------------------------------- adapters


def adapter_state_dict(model):
    """The trained factors and the initial ones, per layer: '{name}.U_p', ..., '{name}.Vt_p0'.

    With both, the learned change W_p,t - W_p,0 can be applied to the original base
    model (whose weight is W_r + W_p,0) without its W_r and without a new SVD.
    """
    return {f"{name}.{key}": getattr(mod, key).detach().cpu().clone()
            for name, mod in _require_adapters(model) for key in ADAPTER_KEYS}


def save_adapter(model, path):
    """Write adapter_state_dict(model) to `path` atomically (a temporary file, then rename)."""
    state = adapter_state_dict(model)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".sorsa-adapter-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _group_adapter_state(state):
    """{layer name: {key: tensor}} from a flat adapter state dict, checking every key."""
    if not isinstance(state, dict) or not state:
        raise ValueError("an adapter state must be a non-empty dict from adapter_state_dict()")
    layers = {}
    for full_key, tensor in state.items():
        name, _, key = full_key.rpartition(".")
        if key not in ADAPTER_KEYS or not name:
            raise ValueError(f"unexpected key {full_key!r} in adapter state; keys end in one of {ADAPTER_KEYS}")
        layers.setdefault(name, {})[key] = tensor
    for name, parts in layers.items():
        missing = [k for k in ADAPTER_KEYS if k not in parts]
        if missing:
            raise ValueError(f"adapter state for {name} lacks {', '.join(missing)}")
    return layers


def _check_adapter_layer(model, name, parts):
    """Raise unless model.<name> is a plain nn.Linear whose shape the adapter factors fit."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"the adapter has layer {name}, which this model lacks; is it the right base model?") from None
    if type(mod) is not nn.Linear:
        raise TypeError(f"the adapter targets {name}, which is {type(mod).__name__}, not a plain nn.Linear base layer")
    m, n = mod.weight.shape
    r = parts["S_p"].shape[0] if parts["S_p"].dim() == 1 else -1
    shape_of = {"U_p": (m, r), "S_p": (r,), "Vt_p": (r, n)}  # the initial U_p0, S_p0, Vt_p0 alike
    for key in ADAPTER_KEYS:
        expected = shape_of[key.removesuffix("0")]
        if tuple(parts[key].shape) != expected:
            raise ValueError(
                f"adapter tensor {name}.{key} has shape {tuple(parts[key].shape)} but layer {name} "
                f"is {m}x{n} (out x in), which needs {expected}; is it the right base model?"
            )
    _check_rank(r, m, n, f" for layer {name}")
    for key in ADAPTER_KEYS:
        if not parts[key].is_floating_point() or not torch.isfinite(parts[key]).all():
            raise ValueError(f"adapter tensor {name}.{key} is not finite floating point data")


def load_adapter(model, state):
    """Put a saved adapter (a dict or a file path) onto the original base model; return the names.

    Each target nn.Linear (weight W_0) becomes a SORSA layer with W_r = W_0 - W_p,0 and the
    trained U_p, S_p, Vt_p, so its weight is W_0 + (W_p,t - W_p,0). No SVD is computed.
    Everything is checked before the model is touched.
    """
    if not isinstance(state, dict):
        state = torch.load(state, map_location="cpu", weights_only=True)
    layers = _group_adapter_state(state)
    if sorsa_modules(model):
        raise ValueError("the model already has SORSA adapters; load an adapter onto the base model")
    for name, parts in layers.items():
        _check_adapter_layer(model, name, parts)
    new = {}
    for name, parts in layers.items():
        base = model.get_submodule(name)
        p = {k: v.to(device=base.weight.device, dtype=base.weight.dtype) for k, v in parts.items()}
        with torch.no_grad():
            layer = SORSALinear(p["U_p0"], p["S_p0"], p["Vt_p0"],
                                residual(base.weight, p["U_p0"], p["S_p0"], p["Vt_p0"]), base.bias)
            for key in ("U_p", "S_p", "Vt_p"):
                getattr(layer, key).copy_(p[key])
        new[name] = layer
    _replace_all(model, new)
    _freeze_all_but_adapters(model)
    return list(layers)


def lora_state_dict(model):
    """The learned change as plain LoRA factors: '{name}.lora_A.weight' (2r, n), '.lora_B.weight' (m, 2r).

    B @ A = U_p,t diag(S_p,t) Vt_p,t - U_p,0 diag(S_p,0) Vt_p,0 = W_p,t - W_p,0, a rank-2r
    product that any LoRA loader can add to the original base weight; use scaling 1
    (in PEFT: r = lora_alpha = 2r).
    """
    out = {}
    for name, mod in _require_adapters(model):
        cd = _compute_dtype(mod.U_p.dtype)
        with torch.no_grad():
            B = torch.cat([mod.U_p.to(cd) * mod.S_p.to(cd), -mod.U_p0.to(cd) * mod.S_p0.to(cd)], dim=1)  # (m, 2r)
            A = torch.cat([mod.Vt_p.to(cd), mod.Vt_p0.to(cd)], dim=0)  # (2r, n)
        out[f"{name}.lora_A.weight"] = A.to(mod.U_p.dtype).cpu()
        out[f"{name}.lora_B.weight"] = B.to(mod.U_p.dtype).cpu()
    return out


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
