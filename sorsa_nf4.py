"""SORSA on a 4-bit base: the frozen residual W_r stored in NF4, so that a 7B model fine-tunes on a 16 GB GPU.

For a weight W_0 (m, n), as sorsa.py, with one step added after Eq. 2:

    U_p, S_p, Vt_p = the top r singular triplets of W_0      (Eq. 1), in float32 or wider
    W_r = W_0 - U_p diag(S_p) Vt_p                           (Eq. 2), then at once
    Q(W_r): NF4 (QLoRA's 4-bit format), 16 levels times each block of 64 weights' absmax, the absmaxes
            in 8 bits in blocks of 256: 4.127 bits a weight
    y = x Q(W_r)^T + ((x Vt_p^T) * S_p) U_p^T + b            (Eq. 3 on the quantized residual)

This is QPiSSA's idea (the PiSSA paper): the top r triplets, which carry W_0's largest part, stay in float32
and train; only the residual is quantized, and it quantizes with less error than W_0 where the top r carry
its energy (theory/README.md, claim 10). The layer is sorsa.SORSALinear holding torchao's NF4Tensor as its
W_r: its forward (NF4 dequantized to the activations' dtype), the regularizer, adapters, PEFT export and
merge are sorsa's and sorsa_integrations'. What this module adds:
  apply_sorsa   the split layer by layer on the device, each W_r quantized at once: never more there than
                the quantized model and one layer's split in full precision; the base on the CPU, or on
                the meta device with its weights read a layer at a time from a checkpoint (LazyCheckpoint)
  load_adapter  an adapter onto the full-precision base it was made from, as the quantized model
  check_fsdp    the shapes FSDP2 can shard in NF4, checked before fully_shard
  nf4_bytes     what Q(W_r) takes, counted from its shape
torchao is optional: it is imported when first needed, and its absence named (pip install torchao).
"""

import collections.abc
import math
import os

import torch
import torch.nn as nn

import sorsa
import sorsa_integrations as si

BLOCK_SIZE = 64  # QLoRA's NF4: weights sharing one absmax
SCALER_BLOCK_SIZE = 256  # absmaxes sharing one 8-bit quantization of them ("double quantization")
NF4_LEVELS = 16  # the 4-bit code book, stored with every tensor in its dtype


# ----------------------------------------------------------------------------- torchao, and the checks


def _nf4():
    """torchao's (NF4Tensor, to_nf4), or an ImportError that says how to install it."""
    try:
        from torchao.quantization import NF4Tensor, to_nf4
    except ImportError as err:
        raise ImportError(f"sorsa_nf4 stores W_r in torchao's NF4 format, and torchao is missing ({err}): "
                          "pip install torchao (this project tests torchao==0.18.0). Nothing was changed") from None
    return NF4Tensor, to_nf4


def is_quantized(weight):
    """Whether a weight is stored quantized: an NF4Tensor (also inside an FSDP2 shard) or a 1-byte dtype
    (bitsandbytes' packed 4-bit and 8-bit weights, float8)."""
    local = weight.to_local() if hasattr(weight, "to_local") else weight
    if type(local).__name__ == "NF4Tensor":
        return True
    return not local.is_floating_point() or local.dtype.itemsize < 2


def _check_block_sizes(block_size, scaler_block_size):
    for name, value in (("block_size", block_size), ("scaler_block_size", scaler_block_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if block_size % 2:
        raise ValueError(f"block_size must be even (two 4-bit codes a byte), got {block_size}")


def _fitting_scaler_block(block_counts, scaler_block_size):
    """The largest scaler block, at most scaler_block_size, that tiles every count of blocks (1 at worst)."""
    common = math.gcd(*block_counts)
    return max(d for d in range(1, min(common, scaler_block_size) + 1) if common % d == 0)


def check_blocks(shapes, block_size=BLOCK_SIZE, scaler_block_size=SCALER_BLOCK_SIZE, what="layer"):
    """Raise unless every (m, n) in shapes ({name: shape}) tiles into blocks and scaler blocks: m n a
    multiple of block_size, and m n / block_size one of scaler_block_size. The message names a scaler
    block that fits."""
    _check_block_sizes(block_size, scaler_block_size)
    numels = {name: math.prod(shape) for name, shape in shapes.items()}
    odd = [f"{name} {'x'.join(map(str, shapes[name]))}" for name, k in numels.items() if k % block_size]
    if odd:
        raise ValueError(f"NF4 quantizes blocks of {block_size} weights, which do not tile {what} {', '.join(odd)}; "
                         "exclude it from target_modules or choose a block_size dividing its size. Nothing was changed")
    blocks = {name: k // block_size for name, k in numels.items()}
    unfit = [f"{name} ({blocks[name]} blocks)" for name in blocks if blocks[name] % scaler_block_size]
    if unfit:
        fit = _fitting_scaler_block(list(blocks.values()), scaler_block_size)
        raise ValueError(f"NF4 quantizes the absmaxes of blocks of {block_size} in groups of scaler_block_size="
                         f"{scaler_block_size}, which do not tile {what} {', '.join(unfit)}; "
                         f"scaler_block_size={fit} tiles every one. Nothing was changed")


def quantize(W_r, block_size=BLOCK_SIZE, scaler_block_size=SCALER_BLOCK_SIZE):
    """Q(W_r): an NF4Tensor of W_r (m, n), in W_r's dtype and on its device (the dtype merge gives back)."""
    _, to_nf4 = _nf4()
    check_blocks({"W_r": tuple(W_r.shape)}, block_size, scaler_block_size, what="the weight")
    return to_nf4(W_r.detach().contiguous(), block_size, scaler_block_size)


def nf4_bytes(shape, dtype=torch.bfloat16, block_size=BLOCK_SIZE, scaler_block_size=SCALER_BLOCK_SIZE):
    """Bytes of Q(W) for a weight of `shape` in `dtype`: 4 bits a weight, an int8 absmax a block, a `dtype`
    factor a scaler block, and the absmaxes' mean and the 16 levels in `dtype`."""
    numel = math.prod(shape)
    blocks = numel // block_size
    return numel // 2 + blocks + (blocks // scaler_block_size + 1 + NF4_LEVELS) * dtype.itemsize


def _refuse_quantized(model, verb):
    """Raise, naming them, if any linear layer of the model holds a quantized weight."""
    done = [name for name, mod in model.named_modules()
            if sorsa._base_weight(mod) is not None and is_quantized(sorsa._base_weight(mod))]
    if done:
        raise TypeError(f"{verb}: the weights of {', '.join(done)} are already quantized; SORSA splits the "
                        "full-precision weight and quantizes its residual after the split (Q(W_0) cannot give "
                        "W_r back). Load the base in bf16 or float32. Nothing was changed")


# ----------------------------------------------------------------------------- a base on the meta device


class LazyCheckpoint(collections.abc.Mapping):
    """{name: tensor} of a checkpoint's safetensors files, each tensor read from disk when it is asked for
    (and cast to `dtype`, if given: Llama 2's float16 files loaded in bf16): a base_state for apply_sorsa
    that never holds the whole checkpoint in memory."""

    def __init__(self, paths, dtype=None):
        from safetensors import safe_open
        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        self.files = {key: f for f in (safe_open(p, "pt") for p in paths) for key in f.keys()}
        self.dtype = dtype

    def __getitem__(self, key):
        tensor = self.files[key].get_tensor(key)
        return tensor if self.dtype is None or not tensor.is_floating_point() else tensor.to(self.dtype)

    def __iter__(self):
        return iter(self.files)

    def __len__(self):
        return len(self.files)


def _meta_tensors(model):
    """[(names, is_parameter)] of the model's tensors on the meta device, one entry a tensor: tied parameters
    share one, under all their names."""
    groups = {}
    for kind, items in (("parameter", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in items:
            if t.is_meta:
                groups.setdefault(id(t), ([], kind == "parameter"))[0].append(name)
    return [(tuple(names), is_param) for names, is_param in groups.values()]


def _check_base_state(model, names, base_state):
    """Raise unless base_state holds each adapted layer's weight (and bias) and one name of every other
    tensor of the model still on the meta device; check nothing else (a lazy checkpoint reads no tensor)."""
    if not isinstance(base_state, collections.abc.Mapping):
        raise TypeError(f"base_state must be a mapping of names to tensors (a state dict, LazyCheckpoint), "
                        f"got {type(base_state).__name__}")
    adapted = {f"{n}.{key}" for n in names for key in ("weight", "bias")}
    missing = [f"{n}.weight" for n in names if f"{n}.weight" not in base_state]
    missing += [f"{n}.bias" for n in names if model.get_submodule(n).bias is not None and f"{n}.bias" not in base_state]
    for group, _ in _meta_tensors(model):
        if not set(group) & adapted and not any(n in base_state for n in group):
            missing.append(" = ".join(group))
    if missing:
        listed = ", ".join(missing[:8]) + (", ..." if len(missing) > 8 else "")
        raise ValueError(f"the model is on the meta device, and base_state lacks {len(missing)} of its tensors: "
                         f"{listed}. Non-persistent buffers (a rotary embedding's inv_freq) are not in checkpoints: "
                         "build those modules on the device before adapting. Nothing was changed")


def _load_rest(model, base_state, device):
    """Every tensor of the model still on the meta device, from base_state onto the device; tied parameters
    stay tied (one tensor, set under each of its names)."""
    for group, is_param in _meta_tensors(model):
        value = _to(base_state[next(n for n in group if n in base_state)], device)
        if is_param:
            value = nn.Parameter(value, requires_grad=False)
        for name in group:
            owner, _, attribute = name.rpartition(".")
            setattr(model.get_submodule(owner), attribute, value)


def _base_values(model, name, base_state, device):
    """W_0 (m, n) and the bias of a layer on the device: the layer's own, or read from base_state for a layer
    on the meta device, its shape and precision checked (a read tensor is seen only now; svd_split checks
    its values)."""
    layer = model.get_submodule(name)
    W_0, bias = sorsa._base_weight(layer), layer.bias
    if W_0.is_meta:
        stored = base_state[f"{name}.weight"]
        W_0 = stored if isinstance(layer, nn.Linear) else stored.mT  # Conv1D stores (in, out)
        bias = base_state[f"{name}.bias"] if bias is not None else None
        if W_0.shape != sorsa._base_weight(layer).shape or is_quantized(W_0):
            raise ValueError(f"base_state's {name}.weight is {tuple(stored.shape)} {stored.dtype}, but the layer "
                             f"needs {tuple(layer.weight.shape)} in full precision: is it this model's checkpoint?")
    return _to(W_0, device), None if bias is None else _to(bias, device)


def _to(tensor, device):
    """The tensor on `device`; where it is for device None."""
    return tensor if device is None else tensor.to(device)


# ----------------------------------------------------------------------------- adapt, load


def apply_sorsa(model, rank, target_modules=None, niter=None, factor_dtype=None, modules_to_save=None,
                device=None, base_state=None, block_size=BLOCK_SIZE, scaler_block_size=SCALER_BLOCK_SIZE):
    """sorsa_integrations.apply_sorsa with each W_r quantized to NF4 as soon as its layer is split; return the
    adapted layers' names. device: where the adapted model goes, one layer at a time (the split runs there,
    in float32 or wider); default, where each layer is. A model on the meta device reads each layer's weights
    from base_state (a state dict or a LazyCheckpoint) when it is split, and its other tensors at the end.
    Everything that can be checked without reading a weight is checked before the first layer changes."""
    _nf4()
    _check_block_sizes(block_size, scaler_block_size)
    model = si._check_base_model(model, "sorsa_nf4.apply_sorsa")
    sorsa._check_args(rank, niter, factor_dtype)
    _refuse_quantized(model, "sorsa_nf4.apply_sorsa")  # before sorsa's checks, which cannot read NF4
    full = si._select_full(model, modules_to_save)
    names = si._select_targets(model, rank, sorsa._target_patterns(target_modules), full)
    shapes = {n: tuple(sorsa._base_weight(model.get_submodule(n)).shape) for n in names}
    check_blocks(shapes, block_size, scaler_block_size)
    meta = any(t.is_meta for t in model.parameters())
    if meta and base_state is None:
        raise ValueError("the model is on the meta device: pass base_state (its state dict, or "
                         "LazyCheckpoint(paths)) to read each layer's weights from. Nothing was changed")
    if meta:
        _check_base_state(model, names, base_state)
    elif base_state is not None:
        raise ValueError("base_state is for a model on the meta device; this one holds its weights. "
                         "Nothing was changed")

    def build(name):  # one layer in full precision on the device at a time
        W_0, bias = _base_values(model, name, base_state, device)  # (m, n)
        try:
            U_p, S_p, Vt_p, W_r = sorsa.svd_split(W_0, rank, niter, factor_dtype)  # Eqs. 1-2, wide inside
        except ValueError as err:  # a NaN in a weight read from base_state: seen only now
            err.add_note(f"in layer {name}")
            raise
        del W_0
        W_r = quantize(W_r, block_size, scaler_block_size)  # Q(W_r), in the base's dtype
        return sorsa.SORSALinear(U_p, S_p, Vt_p, W_r, bias, type(model.get_submodule(name)))
    sorsa._convert(model, names, build)
    if meta:
        _load_rest(model, base_state, device)
    elif device is not None:
        model.to(device)  # the rest: embeddings, norms, the head (an NF4 W_r moves as NF4)
    si._train_in_full(model, dict.fromkeys(full))
    return names


def load_adapter(model, state, factor_dtype=None, check_base=True, device=None, block_size=BLOCK_SIZE,
                 scaler_block_size=SCALER_BLOCK_SIZE):
    """sorsa_integrations.load_adapter (a dict or a save_adapter file) onto the full-precision base the
    adapter was made from, then each W_r = W_0 - U_p0 diag(S_p0) Vt_p0 quantized, one layer at a time, and
    moved to device: on the same device this is the quantized model the adapter was trained on, bit for bit.
    Every check (sorsa's, the base's, the blocks) runs before the first layer changes."""
    _nf4()
    _check_block_sizes(block_size, scaler_block_size)
    if isinstance(state, (str, os.PathLike)):
        state = si.load_checked(state)[0]
    if not isinstance(state, dict):
        raise TypeError(f"state must be an adapter dict or a file path, got {type(state).__name__}")
    inner = sorsa.unwrap(model)
    named = dict(inner.named_modules()) if isinstance(inner, nn.Module) else {}
    layers = {str(k).rpartition(".")[0] for k in state if f".{si.FULL}." not in str(k)}
    present = [n for n in sorted(layers) if sorsa._base_weight(named.get(n)) is not None]
    if named:
        _refuse_quantized(inner, "sorsa_nf4.load_adapter")
    if any(sorsa._base_weight(named[n]).is_meta for n in present):
        raise ValueError("load_adapter needs the base's values to compute W_r: load the base on the CPU "
                         "(device= moves each quantized layer). Nothing was changed")
    check_blocks({n: tuple(sorsa._base_weight(named[n]).shape) for n in present}, block_size, scaler_block_size)
    names = si.load_adapter(model, state, factor_dtype, check_base)  # its own checks first, then W_r in full
    for name in names:
        layer = inner.get_submodule(name)
        W_r = quantize(_to(layer.W_r, device), block_size, scaler_block_size)
        layer.W_r = nn.Parameter(W_r, requires_grad=False)
        if device is not None:
            layer.to(device)
    if device is not None:
        inner.to(device)
    return names


# ----------------------------------------------------------------------------- FSDP2


def check_fsdp(model, world_size=None):
    """Raise unless FSDP2 can shard every NF4 W_r of the model by rows among world_size ranks (default:
    torch.distributed's): torchao splits an NF4Tensor only into equal row shards that its blocks tile. Call it
    before fully_shard; a layer that fails can be quantized with a smaller scaler_block_size."""
    world = world_size or torch.distributed.get_world_size()
    layers = [(name, layer.W_r) for name, layer in sorsa.sorsa_modules(model) if is_quantized(layer.W_r)]
    uneven = [f"{name} ({W_r.shape[0]} rows)" for name, W_r in layers if W_r.shape[0] % world]
    if uneven:
        raise ValueError(f"FSDP2 shards an NF4 W_r only into equal row blocks, and {world} ranks do not divide "
                         f"{', '.join(uneven)}: keep those layers out of the adapted ones or choose another world "
                         "size")
    for name, W_r in layers:  # each its own block sizes
        shard = {f"{name} ({W_r.shape[0] // world} rows a rank)": (W_r.shape[0] // world, W_r.shape[1])}
        check_blocks(shard, W_r.block_size, W_r.scaler_block_size, what="the row shard of")
