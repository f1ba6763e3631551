"""What SORSA needs beyond one plain PyTorch process, beside sorsa.py (which never imports this file).

- The models people fine-tune: nn.Linear subclasses (Falcon's FalconLinear) checked by a probe,
  nn.MultiheadAttention's out_proj left alone, heads narrower than the rank skipped, modules trained
  in full beside the adapters (PEFT's modules_to_save), PEFT models refused, a model wholly on the meta
  device adapted for its shapes, near names suggested for a target that matches nothing.
  apply_sorsa and load_adapter here do all that sorsa's do, and these.
- Files: adapters written atomically with a checksum, by rank 0 alone under torch.distributed;
  the learned change exported as a PEFT LoRA adapter (adapter_model.safetensors).
- FSDP2: a shard placement that keeps the regularizer's all-reduces r x r; the split of a model that
  exists only in shards; a torchrun process's end on gloo.

Hugging Face users import this module beside sorsa: `import sorsa, sorsa_integrations as si`.
"""

import ctypes
import difflib
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import Shard

import sorsa

FULL = "modules_to_save"  # '{name}.modules_to_save.{key}': a module trained in full, in an adapter state


# ----------------------------------------------------------------------------- files: atomic, checksummed, rank 0


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


def _sha256(tensors):
    """SHA-256 of the names, dtypes, shapes and bytes of a dict of tensors."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()  # host memory, one block
        h.update(f"{key} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(ctypes.string_at(t.data_ptr(), t.nbytes))  # any dtype's bytes, bf16 too, without numpy
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


# ----------------------------------------------------------------------------- the models people fine-tune


def _check_base_model(model, verb):
    """sorsa's checks of the model to convert, and no other adapter method's (PEFT) inside it."""
    model = sorsa._model_to_convert(model, verb)
    peft = sorted({type(mod).__name__ for mod in model.modules() if type(mod).__module__.split(".")[0] == "peft"})
    if peft:  # found by module path, without importing peft
        raise TypeError(f"{verb} needs the base model, but this one holds PEFT's {', '.join(peft)} (another "
                        f"adapter method, e.g. from get_peft_model); nothing was changed. Call {verb} on the model "
                        "before PEFT wraps it, or on peft_model.merge_and_unload()")
    return model


def _computes_linear(layer):
    """Whether an nn.Linear subclass computes x W^T + b: true where its forward is nn.Linear's; one with its
    own forward (Falcon's FalconLinear) is run on a seeded probe and compared with F.linear (a router or a
    quantized layer does not match). On the meta device it cannot be told: true."""
    if type(layer).forward is nn.Linear.forward or layer.weight.is_meta:
        return True
    W = layer.weight
    x = torch.randn(2, layer.in_features, generator=torch.Generator(device=W.device).manual_seed(0), device=W.device)
    try:
        with torch.no_grad():
            y, expected = layer(x.to(W.dtype)), F.linear(x.to(W.dtype), W, layer.bias)
    except Exception:  # a weight F.linear cannot use (float8, int8) or a forward that wants more
        return False
    scale = expected.float().abs().max().item()
    return (isinstance(y, torch.Tensor) and y.shape == expected.shape and
            torch.allclose(y.float(), expected.float(), rtol=0, atol=1e-2 * scale + 1e-30))


def _unfit_reason(model, name, layer):
    """Why a layer cannot be adapted, or None: its parent reads its weight instead of calling it
    (nn.MultiheadAttention's out_proj: a SORSA layer there would be bypassed), or its forward is not
    x W^T + b (checked by a probe for an nn.Linear subclass)."""
    if isinstance(model.get_submodule(name.rpartition(".")[0]), nn.MultiheadAttention):
        return f"{type(layer).__name__}, whose weight its parent nn.MultiheadAttention reads directly"
    if isinstance(layer, nn.Linear) and not _computes_linear(layer):
        return f"{type(layer).__name__}, whose forward is not x W^T + b"
    return None


def _select_full(model, modules_to_save):
    """Names of the modules that train in full, one per pattern in modules_to_save (matched as targets)."""
    patterns = () if modules_to_save is None else sorsa._target_patterns(modules_to_save, "modules_to_save")
    names = []
    for pattern in patterns:
        found = [name for name, _ in model.named_modules() if name and sorsa._matches(name, pattern)]
        if not found:
            raise ValueError(f"modules_to_save {pattern!r} matches no module of the model; nothing was changed")
        names += [name for name in found if not any(name.startswith(f + ".") for f in found)]
    return sorted(set(names))


def _check_targets_match(model, targets):
    """Raise unless every pattern matches a module, suggesting near layer names."""
    modules = [(name, mod) for name, mod in model.named_modules() if name]
    for target in targets or ():
        if not any(sorsa._matches(name, target) for name, _ in modules):
            linears = [name for name, mod in modules if sorsa._base_weight(mod) is not None]
            suffixes = {".".join(name.split(".")[i:]) for name in linears for i in range(name.count(".") + 1)}
            near = difflib.get_close_matches(target, suffixes, n=5, cutoff=0.6) or sorted(
                {name.rsplit(".", 1)[-1] for name in linears})[:8]
            raise ValueError(f"target {target!r} matches no layer of the model; nothing was changed. "
                             f"Near names: {', '.join(near) or 'none: the model has no nn.Linear'}")


def _select_targets(model, rank, targets, full):
    """sorsa's selection for the models people fine-tune: the layers matching targets, or by default every
    linear layer (nn.Linear, its subclasses that pass _computes_linear's probe, Conv1D-style) but, named in a
    warning, what _unfit_reason refuses, the output head, tied weights and layers with fewer outputs than the
    rank; layers inside a module that trains in full are left to it. A model partly on the meta device is
    refused; one wholly on it is adapted for its shapes."""
    _check_targets_match(model, targets)
    owner = {name: f for name, _ in model.named_modules() for f in full if name == f or name.startswith(f + ".")}
    why_skipped, selected, skipped = sorsa._skip_reason(model, targets), [], []
    for name, layer in model.named_modules():
        W_0 = sorsa._base_weight(layer)  # (m, n), or None
        matched = any(sorsa._matches(name, t) for t in targets) if targets else W_0 is not None
        if not name or not matched:
            continue
        if name in owner:  # by default, what trains in full is left to it silently
            if targets:
                raise ValueError(f"{name} matches the targets but is in {owner[name]}, which trains in full; "
                                 "exclude it from target_modules")
            continue
        unfit = f"{type(layer).__name__}, not nn.Linear or a Conv1D-style layer"
        if W_0 is not None:
            unfit = _unfit_reason(model, name, layer)
        if targets and unfit:
            raise TypeError(f"{name} matches the targets but is {unfit}; exclude it from target_modules")
        (m, n), reason = W_0.shape, unfit or why_skipped(name, layer)
        if not reason and not targets and m < rank <= n:  # named, the rank check refuses it instead
            reason = (f"rank {rank} is above its {m} outputs: a new classification head trains in full with "
                      "modules_to_save")
        if reason:
            skipped.append(f"{name} ({reason})")
            continue
        if W_0.is_meta and not 1 <= rank <= min(m, n):  # sorsa's checks need the values
            raise ValueError(f"rank {rank} is outside [1, min(out, in)] = [1, {min(m, n)}] for layer {name}")
        if not W_0.is_meta:
            sorsa._check_weight(W_0, rank, where=f" for layer {name}")
        selected.append(name)
    sorsa._selected(selected, skipped)
    meta = [name for name in selected if sorsa._base_weight(model.get_submodule(name)).is_meta]
    if meta and not all(p.is_meta for p in model.parameters()):
        listed = ", ".join(meta[:8]) + (", ..." if len(meta) > 8 else "")
        raise ValueError(f"{len(meta)} of the {len(selected)} layers to adapt have their weights on the meta "
                         f"device (offloaded, or never loaded): {listed}. "
                         "Their SVD needs the values: load the model fully first (no disk offload). Nothing was "
                         "changed. A model wholly on meta is adapted for its shapes only")
    return selected


def _sorsa_layer(layer, rank, niter, factor_dtype):
    """sorsa.SORSALinear.from_linear(layer, ...); on the meta device, a SORSA layer of the right shapes and
    dtypes, with no SVD: the structure that fully_shard shards before split_sharded fills it."""
    W_0 = sorsa._base_weight(layer)
    if not W_0.is_meta:
        return sorsa.SORSALinear.from_linear(layer, rank, niter, factor_dtype)
    (m, n), dtype = W_0.shape, factor_dtype or sorsa._wide_dtype(W_0.dtype)
    with torch.device("meta"):
        factors = torch.empty(m, rank, dtype=dtype), torch.empty(rank, dtype=dtype), torch.empty(rank, n, dtype=dtype)
        W_r = torch.empty(m, n, dtype=W_0.dtype)
    return sorsa.SORSALinear(*factors, W_r, layer.bias, type(layer))


def full_modules(model):
    """(name, module) pairs of the modules that train in full beside the adapters (modules_to_save)."""
    return [(name, mod) for name, mod in sorsa.unwrap(model).named_modules()
            if getattr(mod, "sorsa_trains_in_full", False)]


def _train_in_full(model, full):
    """Mark the modules of `full` ({name: state dict to load, or None}) to train in full, and unfreeze them."""
    for name, state in full.items():
        mod = model.get_submodule(name)
        if state is not None:
            mod.load_state_dict(state)
        mod.sorsa_trains_in_full = True
        mod.requires_grad_(True)


def apply_sorsa(model, rank, target_modules=None, niter=None, factor_dtype=None, modules_to_save=None):
    """sorsa.apply_sorsa for the models people fine-tune; return the adapted layers' names.

    target_modules None (or "all-linear"): every layer computing x W^T + b (nn.Linear, subclasses that
    pass the probe, Conv1D-style) but, with a warning, the output head, tied weights, layers with fewer
    outputs than the rank and nn.MultiheadAttention's out_proj; or names, matched against the end of
    module names. modules_to_save: modules that train in full and travel with the adapter (a new head:
    ["classifier"]), as in PEFT. Everything is checked before the first layer is touched.
    """
    model = _check_base_model(model, "apply_sorsa")
    sorsa._check_args(rank, niter, factor_dtype)
    full = _select_full(model, modules_to_save)
    names = _select_targets(model, rank, sorsa._target_patterns(target_modules), full)
    sorsa._convert(model, names, lambda name: _sorsa_layer(model.get_submodule(name), rank, niter, factor_dtype))
    _train_in_full(model, dict.fromkeys(full))
    return names


# ----------------------------------------------------------------------------- adapters with their files


def adapter_state_dict(model):
    """sorsa.adapter_state_dict, and the state of each module trained in full ('{name}.modules_to_save.{key}')."""
    state = sorsa.adapter_state_dict(model)
    state.update({f"{name}.{FULL}.{key}": sorsa._whole(t).detach().to("cpu", copy=True)
                  for name, mod in full_modules(model) for key, t in mod.state_dict().items()})
    return state


def save_adapter(model, path):
    """Write adapter_state_dict(model) to `path` atomically, with a checksum (save_checked). Under
    torch.distributed call it on every rank: rank 0 writes, every rank returns once the file is complete."""
    state = adapter_state_dict(model)  # every rank: FSDP2's shards are gathered
    _rank_0_writes(lambda: save_checked(state, path), path)


def load_adapter(model, state, factor_dtype=None, check_base=True):
    """sorsa.load_adapter for a dict or a save_adapter file, with the modules trained in full; return the
    layers' names. Everything is checked before the model is touched."""
    if not isinstance(state, (dict, str, os.PathLike)):
        raise TypeError(f"state must be an adapter dict or a file path, got {type(state).__name__}")
    model = _check_base_model(model, "load_adapter")
    source, state = ("the adapter state", state) if isinstance(state, dict) else \
        (f"adapter file {state}", load_checked(state)[0])
    full = {}
    for key in [k for k in state if f".{FULL}." in str(k)]:
        module, _, rest = str(key).partition(f".{FULL}.")
        full.setdefault(module, {})[rest] = state[key]
    for name, parts in full.items():
        try:
            own = model.get_submodule(name).state_dict()
        except AttributeError:
            raise ValueError(f"{source} has module {name}, which this model lacks; "
                             "is it the right base model?") from None
        if own.keys() != parts.keys() or any(own[k].shape != parts[k].shape for k in own):
            raise ValueError(f"{source}: module {name}, trained in full, has keys and shapes "
                             f"{ {k: tuple(v.shape) for k, v in parts.items()} } but this model's is "
                             f"{ {k: tuple(v.shape) for k, v in own.items()} }; is it the right base model?")
    layers = {k: v for k, v in state.items() if f".{FULL}." not in str(k)}
    names = sorsa.load_adapter(model, layers, factor_dtype, check_base, source)
    _train_in_full(model, full)
    return names


def lora_state_dict(model):
    """The learned change as plain LoRA factors, '{name}.lora_A.weight' (2r, n) and '.lora_B.weight' (m, 2r):
    B A = U_p,t diag(S_p,t) Vt_p,t - U_p,0 diag(S_p,0) Vt_p,0 = W_p,t - W_p,0, which any LoRA loader adds
    to the original base weight with scaling 1. A module trained in full comes whole, '{name}.{key}'."""
    state = adapter_state_dict(model)
    out = {k.replace(f".{FULL}.", "."): v for k, v in state.items() if f".{FULL}." in k}
    for name, mod in sorsa.sorsa_modules(model):
        U, S, Vt, U0, S0, Vt0 = (state[f"{name}.{key}"] for key in sorsa.ADAPTER_KEYS)
        out[f"{name}.lora_A.weight"] = torch.cat([Vt, Vt0], dim=0)  # (2r, n)
        out[f"{name}.lora_B.weight"] = torch.cat([U * S, -U0 * S0], dim=1)  # (m, 2r)
    return out


def save_lora(model, directory, base_name=None):
    """Write the learned change as a PEFT LoRA adapter, for PeftModel.from_pretrained(base, directory).

    adapter_model.safetensors: lora_state_dict(model) under PEFT's keys, the pickle-free format PEFT's
    save_pretrained writes by default (safetensors comes with peft). adapter_config.json: r = lora_alpha =
    2 rank (scaling 1), fan_in_fan_out for Conv1D-style layers, modules trained in full as
    modules_to_save. Call it on every rank, as save_adapter.
    """
    from safetensors.torch import save  # peft's own dependency: imported only here

    weights = {f"base_model.model.{k}": v.contiguous() for k, v in lora_state_dict(model).items()}
    found = sorsa.sorsa_modules(model)
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
        write_atomically(os.path.join(directory, "adapter_model.safetensors"),
                         lambda f: f.write(save(weights, metadata={"format": "pt"})))
        write_atomically(os.path.join(directory, "adapter_config.json"),
                         lambda f: f.write(json.dumps(config, indent=2).encode()))
    _rank_0_writes(write, directory)


# ----------------------------------------------------------------------------- FSDP2


def fsdp_shard_placement(model, world_size=None):
    """A shard_placement_fn for fully_shard(m, shard_placement_fn=...): Vt_p and Vt_p0 by columns (dim 1),
    so that the regularizer's Gram of Vt_p^T is a sum of r x r parts (one all-reduce), where the world size
    (default: torch.distributed's) divides their width n (FSDP2 shards other dims only evenly); every other
    tensor by rows. The regularizer is correct either way: a Vt_p held by rows is gathered whole."""
    world = world_size or dist.get_world_size()
    by_columns = {id(p) for _, mod in sorsa.sorsa_modules(model) for p in (mod.Vt_p, mod.Vt_p0)
                  if p.shape[1] % world == 0}
    return lambda param: Shard(1) if id(param) in by_columns else None


def end_distributed():
    """The end of a torchrun process on gloo: destroy the process group, then exit at once, without Python's
    finalization. Under FSDP2 the gloo group outlives destroy_process_group (DTensor's caches hold its mesh),
    and a gloo worker thread that frees a tensor while Python finalizes aborts the process ("terminate called
    without an active exception", pytorch#190489; 1 launch in 5 on 2 busy cores): docs/scaling.md."""
    dist.destroy_process_group()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


# ----------------------------------------------------------------------------- the split of a model FSDP2 has sharded


def base_state_for_sorsa(model, state):
    """A base model's state dict with each SORSA layer's `weight` renamed to its `W_r` (transposed for a
    Conv1D's (in, out) layout): what a model adapted on the meta device (apply_sorsa there gives the structure)
    and then sharded loads with PyTorch's own loaders (set_model_state_dict, DCP) before split_sharded."""
    state = dict(state)
    for name, mod in sorsa.sorsa_modules(model):
        key = f"{name}.weight" if name else "weight"
        if key not in state:
            raise KeyError(f"the base state has no {key!r} for SORSA layer {name!r}: is it this model's checkpoint?")
        weight = state.pop(key)
        state[f"{name}.W_r" if name else "W_r"] = weight if issubclass(mod.base_type, nn.Linear) else weight.mT
    return state


def _shard_dim(param):
    """(dim, rank, world) of a parameter FSDP2 holds as one Shard(dim) on a 1-D mesh; (0, 0, 1) for a whole tensor."""
    if not hasattr(param, "placements"):
        return 0, 0, 1
    mesh = param.device_mesh
    if mesh.ndim != 1 or not isinstance(param.placements[0], Shard):
        raise ValueError(f"split_sharded handles one Shard(dim) on a 1-D mesh (fully_shard's default); got "
                         f"{param.placements} on a {mesh.ndim}-D mesh")
    return param.placements[0].dim, mesh.get_local_rank(), mesh.size()


def _chunk(full, dim, rank, world):
    """Rank `rank`'s rows (dim 0) or columns (dim 1) of `full` among `world`: FSDP2's torch.chunk-style shard."""
    size = -(-full.shape[dim] // world)  # the last ranks hold fewer, or none
    start = min(rank * size, full.shape[dim])
    return full.narrow(dim, start, min(size, full.shape[dim] - start))


def _part(full, param):
    """The rows (or columns) of `full` that `param` holds on this rank."""
    return _chunk(full, *_shard_dim(param))


def _local(param):
    return param.to_local() if hasattr(param, "to_local") else param


def _gather_to(param, owner):
    """The whole (m, n) of a sharded parameter on rank `owner` alone (None elsewhere), received shard by shard into
    one buffer (point to point: no gathered copy beside it); a whole tensor is returned as it is on every rank."""
    dim, rank, world = _shard_dim(param)
    local = _local(param).detach()
    if world == 1:
        return local
    group = param.device_mesh.get_group()
    if rank != owner:
        if local.numel():
            dist.send(local.contiguous(), dst=dist.get_global_rank(group, owner), group=group)
        return None
    whole = local.new_empty(param.shape)
    parts = [_chunk(whole, dim, k, world) for k in range(world)]
    received = [p if dim == 0 else torch.empty_like(p) for p in parts]  # a column block is not contiguous
    waits = [dist.irecv(received[k], src=dist.get_global_rank(group, k), group=group)
             for k in range(world) if k != owner and parts[k].numel()]
    received[owner].copy_(local)
    for work in waits:
        work.wait()
    for part, got in zip(parts, received):
        if got is not part:
            part.copy_(got)
    return whole


def _finite(shard):
    """Whether a shard holds no NaN or Inf, by its max and min (NaN spreads through both): no copy of it is made."""
    return shard.numel() == 0 or bool(torch.isfinite(torch.stack([shard.amax(), shard.amin()])).all())


def _every_rank_agrees(error, group, device, done):
    """Raise on every rank if any rank had an error (its message, with the rank, after `done`, what the split has
    changed): no rank waits for one that failed. One all-reduce of a flag; the messages are gathered only then."""
    failed = torch.tensor([error is not None], dtype=torch.int32, device=device)  # NCCL: on the GPU
    if group is not None:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX, group=group)
    if failed.item():
        errors = [error] * (dist.get_world_size(group) if group is not None else 1)
        if group is not None:
            dist.all_gather_object(errors, error, group=group)
        raise ValueError(f"split_sharded {done}: " + "; ".join(f"rank {r}: {e}" for r, e in enumerate(errors)
                                                              if e is not None))


def _in_one_message(parts, send):
    """send(flat) once, flat the parts flattened row-major into one tensor (whatever layout each has: LAPACK's Q is
    column-major, and a collective sends memory as it lies); the parts again, read back from flat."""
    flat = torch.cat([p.flatten() for p in parts])
    send(flat)
    return [f.view(p.shape).to(p.dtype) for f, p in zip(flat.split([p.numel() for p in parts]), parts)]


def _omega(mod, niter):
    """Omega (n, l) where split_sharded splits this layer without gathering its W_0: a randomized SVD
    (sorsa._randomized_svd's, its sketch narrower than the layer) of a W_r that FSDP2 holds by rows on several
    ranks; else None."""
    dim, _, world = _shard_dim(mod.W_r)
    if niter is None or world == 1 or dim != 0:
        return None
    return sorsa._sketch(mod.W_r, mod.rank)  # the whole W_0's shape


def _sketch_width(mod, niter):
    """_omega's width l, or None (the Omega drawn and dropped: sorsa._sketch alone holds the rule)."""
    Omega = _omega(mod, niter)
    return None if Omega is None else Omega.shape[1]


def _sketch_turn(turn, widths, niter, group):
    """sorsa._randomized_svd, up to its last product, of each layer of the turn with a sketch width l (None:
    gathered instead), W_0 left in its row shards: ((Q (m, l), Q^T W_0 (l, n)) of this rank's layer, turn[rank], or
    None; an error message or None). Every product with W_0 is a sum over the ranks' rows (W_i, Q_i: rank i's
    rows): W_0 X has rows W_i X, W_0^T Q = sum W_i^T Q_i, Q^T W_0 = sum Q_i^T W_i. Each rank computes its part of
    every layer's, one all-reduce a step adds a batch's parts (m l or n l numbers a layer), and every rank takes the
    same QRs of the same sums. W_0 itself never travels. A batch is as many layers as fit in the turn's largest
    W_0's bytes: their Omega, parts and sums, (2 m + 2 n) l numbers a layer at the peak, beside the float32 copy of
    a rank's rows that a bf16 W_0 needs."""
    layers = [(mod, l, sorsa._wide_dtype(mod.W_r.dtype)) for mod, l in zip(turn, widths) if l is not None]
    me, world, error, mine = dist.get_rank(group), dist.get_world_size(group), None, None
    copies = [-(-mod.W_r.shape[0] // world) * mod.W_r.shape[1] * wide.itemsize  # local_W's of a bf16 W_0's rows
              for mod, _, wide in layers if mod.W_r.dtype != wide]
    room = max(mod.W_r.numel() * mod.W_r.element_size() for mod in turn) - max(copies + [0])  # the largest W_0's bytes
    batches, held = [], room  # the same on every rank: shapes and dtypes only
    for mod, l, wide in layers:
        need = 2 * sum(mod.W_r.shape) * l * wide.itemsize  # (2 m + 2 n) l numbers
        if held + need > room:
            batches, held = batches + [[]], 0
        batches[-1].append(mod)
        held += need

    def attempt(compute, shape, like):  # a failure is kept, and zeros keep every rank's collectives in step
        nonlocal error  # (compute, a lambda over loop variables, is called at once)
        if error is None:
            try:
                return compute()
            except Exception as err:
                error = f"{type(err).__name__}: {err}"
        return like.new_zeros(shape)

    def summed(parts):  # each rank's parts of the batch's sums -> the sums, on every rank: one message
        return _in_one_message(parts, lambda flat: dist.all_reduce(flat, group=group))

    def local_W(mod, Omega):  # (m_i, n): this rank's rows of W_0, in the SVD's dtype
        return _local(mod.W_r).detach().to(Omega.dtype)

    def W_times(mod, Omega, X):  # W_0 X (m, l): this rank's rows of it, zeros in the others'
        Y = Omega.new_zeros(mod.W_r.shape[0], X.shape[1])
        _part(Y, mod.W_r).copy_(attempt(lambda: local_W(mod, Omega) @ X, _part(Y, mod.W_r).shape, Omega))
        return Y

    def bases(sums):  # (k, l) with orthonormal columns spanning each sum's
        return [attempt(lambda: torch.linalg.qr(Y).Q, Y.shape, Y) for Y in sums]

    for batch in batches:
        batch = [(mod, _omega(mod, niter)) for mod in batch]  # drawn again here: no Omega outlives its batch
        with torch.no_grad(), sorsa._ieee_float32():  # as in sorsa._randomized_svd, line by line:
            Qs = bases(summed([W_times(mod, Omega, Omega) for mod, Omega in batch]))  # Q = qr(W Omega)
            for _ in range(niter):  # Q = qr(W qr(W^T Q))
                Ps = bases(summed([attempt(lambda: local_W(mod, Omega).T @ _part(Q, mod.W_r),
                                           (Omega.shape[0], Q.shape[1]), Q) for (mod, Omega), Q in zip(batch, Qs)]))
                del Qs  # before the next sums are made: one (m, l) a layer fewer at the peak
                Qs = bases(summed([W_times(mod, Omega, P) for (mod, Omega), P in zip(batch, Ps)]))
                del Ps
            Bs = summed([attempt(lambda: _part(Q, mod.W_r).T @ local_W(mod, Omega), (Q.shape[1], Omega.shape[0]), Q)
                         for (mod, Omega), Q in zip(batch, Qs)])  # Q^T W (l, n): its SVD is split_sharded's, on rank k
        mine = next(((Q, B) for (mod, _), Q, B in zip(batch, Qs, Bs) if me < len(turn) and mod is turn[me]), mine)
        del batch, Qs, Bs  # before the next batch: only this rank's layer's are kept
    return mine, error


def _share(mod, factors, owner, group):
    """Broadcast a layer's U_p, S_p, Vt_p from rank `owner` (factors: None on the others) as one message, then _fill
    every rank's shards from them."""
    if factors is None:  # the other ranks receive into these
        factors = [torch.empty(p.shape, dtype=p.dtype, device=_local(p).device) for p in (mod.U_p, mod.S_p, mod.Vt_p)]
    if group is not None:
        factors = _in_one_message(factors, lambda flat: dist.broadcast(flat, dist.get_global_rank(group, owner), group))
    _fill(mod, *factors)


def split_sharded(model, niter=None):
    """Compute the SVD split (Eqs. 1-2) of every SORSA layer of a model that FSDP2 has sharded, in place: the
    layers were made on the meta device (apply_sorsa gives the structure), sharded by fully_shard, and each
    W_r loaded with W_0's shard (base_state_for_sorsa). In turns of `world` layers, layer k of a turn split on
    rank k while the other ranks split theirs, two ways, each giving the factors svd_split gives for the whole W_0
    (to a rounding): randomized (niter) on a W_r held by rows, W_0 is never gathered: the ranks compute the sketch's
    products on their rows and rank k the SVD of the small Q^T W_0 (_sketch_turn); exact (or held by columns), rank
    k receives the layer's W_0 whole (_gather_to). Rank k then broadcasts U_p (m, r), S_p (r,) and Vt_p (r, n), and
    every rank keeps its shards and turns its part of W_0 into W_r = W_0 - U_p diag(S_p) Vt_p (Eq. 2). No rank holds
    more than one layer's whole W_0 beyond its shards (randomized: none). Without torch.distributed (whole tensors)
    it splits every layer itself. Bad input (a non-finite W_0 shard) raises on every rank before anything changes;
    a failure in a rank's computation (a product, a QR, an SVD) raises on every rank, naming how many layers the
    earlier turns split (running out of memory inside a collective is not caught: the others then wait in it)."""
    sorsa._check_args(niter=niter)
    found = sorsa.sorsa_modules(model)
    layers = [mod for _, mod in found]
    if not layers:
        raise ValueError("split_sharded found no SORSA layer: call sorsa_integrations.apply_sorsa on the meta "
                         "model first, then fully_shard, then load the base weights")
    group = layers[0].W_r.device_mesh.get_group() if hasattr(layers[0].W_r, "device_mesh") else None
    _, me, world = _shard_dim(layers[0].W_r)
    device = _local(layers[0].W_r).device
    bad = [name for name, mod in found if not _finite(_local(mod.W_r))]
    _every_rank_agrees(f"W_0 of {', '.join(bad)} holds NaN or Inf: load the base weights before splitting"
                       if bad else None, group, device, "changed nothing")
    for start in range(0, len(layers), world):
        turn = layers[start:start + world]  # layer start + k is rank k's to split
        widths = [_sketch_width(mod, niter) for mod in turn]  # randomized and held by rows: W_0 is never gathered
        gathered = [width is None for width in widths]
        sketched, error = None, None  # (Q, Q^T W_0) of this rank's layer, where it is sketched
        if not all(gathered):
            sketched, error = _sketch_turn(turn, widths, niter, group)
        whole = [_gather_to(mod.W_r, k) if g else None for k, (mod, g) in enumerate(zip(turn, gathered))]
        mine = None
        if me < len(turn) and error is None:
            mod = turn[me]
            try:
                if sketched is None:  # no whole W_r: each rank turns its part of W_0 into it below
                    W_0 = whole[me].to(sorsa._wide_dtype(whole[me].dtype))
                    mine = [t.to(mod.U_p.dtype) for t in sorsa._top_triplets(W_0, mod.rank, niter)]
                else:  # the randomized SVD's end: U_small, S, Vt = svd(Q^T W), U = Q U_small
                    Q, B = sketched  # (the exact SVD of B (l, n), U_small orthonormalized, then U again)
                    U_small, S_p, Vt_p = sorsa._top_triplets(B, mod.rank, None)
                    U_p = sorsa._orthonormalized(Q @ U_small.to(Q.dtype))
                    mine = [t.to(mod.U_p.dtype) for t in (U_p, S_p, Vt_p)]
            except Exception as err:  # told to every rank below, so none waits for this one
                error = f"{type(err).__name__}: {err}"
        del whole, sketched
        _every_rank_agrees(error, group, device, f"split {start} of {len(layers)} layers before this error, the rest "
                           "still hold W_0 (load the base weights again and split again)" if start else "changed nothing")
        for k, mod in enumerate(turn):
            _share(mod, mine if k == me else None, k, group)


def _fill(mod, U_p, S_p, Vt_p):
    """Set a layer's shards of its factors (trainable and initial) from the whole ones, and turn its W_0 shard into
    its W_r shard: W_0's part minus the matching part of U_p diag(S_p) Vt_p (rows of U_p, or columns of Vt_p)."""
    with torch.no_grad():
        for name, whole in (("U_p", U_p), ("S_p", S_p), ("Vt_p", Vt_p), ("U_p0", U_p), ("S_p0", S_p), ("Vt_p0", Vt_p)):
            param = getattr(mod, name)
            _local(param).copy_(_part(whole, param))
        by_rows = _shard_dim(mod.W_r)[0] == 0
        W, U = _local(mod.W_r), _part(U_p, mod.W_r) if by_rows else U_p
        Vt = Vt_p if by_rows else _part(Vt_p, mod.W_r)
        step = max(1, -(-len(W) // 8))  # an 8th of the rows at a time: Eq. 2's wide copy is of that 8th alone
        wide = sorsa._wide_dtype(W.dtype, U_p.dtype)
        with sorsa._ieee_float32():
            for rows, U_rows in zip(W.split(step), U.split(step)):  # Eq. 2, W_0 - U_p diag(S_p) Vt_p, by rows
                rows.copy_(rows.to(wide) - U_rows.to(wide) @ torch.diag(S_p.to(wide)) @ Vt.to(wide))
