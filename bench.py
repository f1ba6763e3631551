"""What SORSA costs: against LoRA, plain linear layers and the other ways to compute it.

Every number is a ratio of two times measured in one run on one machine, the variants
interleaved block by block (absolute CPU times mean little; on a GPU they do). Sections:
  1. adapter layer forward + backward: ours, LoRA, frozen nn.Linear, Eq. 3 literally, and
     the authors' layer (the full (U_p * S_p) @ V_p^T built on every forward)
  2. inference after merge_sorsa against the same model built of plain nn.Linear
  3. initialization: exact against randomized SVD, time and accuracy; all of Llama 2 7B
  4. the regularizer: operations launched for Llama 2 7B's 224 layers, its share of a
     training step of train_tiny's GPT
  5. memory: trainable parameters and optimizer state; apply_sorsa's peak growth; peak GPU
     memory on CUDA
  6. a Llama-shaped model (7B on CUDA, reduced on the CPU) against PEFT's PiSSA, where
     transformers and peft are installed
  7. under torchrun: DDP and FSDP2, what is sent and held per rank
  8. with --peft, alone: SORSA against PEFT's LoRA layer, a 2-block Llama-shaped training
     step against PEFT LoRA, and initialization against PEFT's PiSSA
  9. with --nf4, alone: W_r in NF4 (sorsa_nf4): Llama 2 7B's training state and activations against
     a 16 GB GPU; an NF4 layer's time over a bf16 one's; the adaptation's peak memory; the recipe

    python bench.py            # about 10 minutes on a 2-core CPU
    python bench.py --quick    # about a minute: smaller shapes, fewer cases
    python bench.py --device cuda
    torchrun --standalone --nproc_per_node 2 bench.py --distributed
    python bench.py --device cuda --peft   # where transformers and peft are installed
    python bench.py --device cuda --nf4    # where torchao (and transformers) are installed

The last line printed is one JSON object with the headline ratios.
"""

import argparse
import collections.abc
import ctypes
import copy
import importlib.util
import json
import math
import multiprocessing
import os
import random
import statistics
import sys
import time
import zlib

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import sorsa
import sorsa_integrations
import sorsa_nf4
import train_tiny
from theory.fused_forward import interleaved_times, make_forms, time_forms

LLM_BLOCKS = {  # blocks, and (in, out) of every linear layer of one block, from the published configs
    "Llama 2 7B": (32, [(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)]),
    "Mistral 7B": (32, [(4096, 4096)] * 2 + [(4096, 1024)] * 2 + [(4096, 14336)] * 2 + [(14336, 4096)]),
    "Gemma 7B": (28, [(3072, 4096)] * 3 + [(4096, 3072)] + [(3072, 24576)] * 2 + [(24576, 3072)]),
    "RWKV6 7B": (32, [(4096, 4096)] * 5 + [(4096, 14336), (14336, 4096), (4096, 4096)]),
}
HEADLINE_NITER = 3  # the fewest power iterations that keep the top-r values within 1% (section 3)
LLAMA2_7B_OTHER_PARAMS = 2 * 32000 * 4096 + (2 * 32 + 1) * 4096  # embeddings, head, RMSNorm weights


def meta_blocks(model_name):
    """The linear layers of every block of a 7B model, on the meta device: shapes, no weights."""
    blocks, shapes = LLM_BLOCKS[model_name]
    return nn.ModuleList(nn.ModuleList(nn.Linear(i, o, bias=False, device="meta") for i, o in shapes)
                         for _ in range(blocks))


# ----------------------------------------------------------------------------- 1. layer


def layer_section(cases, device):
    print("\n1. Adapter layer, forward + backward, time / ours")
    names = ("lora", "linear", "literal", "appendixA")
    print(f"{'m x n, r, tokens':>22}" + "".join(f"{n:>10}" for n in names) + f"{'ours ms':>10}")
    ratios = {}
    for m, r, tokens in cases:
        with torch.device(device):  # build the layers and the input on the device
            times = time_forms(make_forms(m, m, r), tokens, m)
        ratios[(m, r, tokens)] = {k: times[k] / times["ours"] for k in names}
        print(f"{f'{m}x{m}, {r}, {tokens}':>22}" + "".join(f"{ratios[(m, r, tokens)][k]:10.2f}" for k in names)
              + f"{times['ours'] * 1e3:10.2f}")
    print("   (appendixA is the authors' released layer: W_r and the full (U_p * S_p) @ V_p^T per call)")
    return ratios


# ----------------------------------------------------------------------------- 2. merged inference


def merge_section(device, d_model, tokens):
    print(f"\n2. Inference after merging (TinyGPT, d_model {d_model}, 4 layers, {tokens} tokens), time / plain")
    cfg = train_tiny.GPTConfig(d_model=d_model, n_layer=4, block_size=tokens)
    torch.manual_seed(0)
    plain = train_tiny.TinyGPT(cfg).to(device).eval()
    adapted = copy.deepcopy(plain)
    sorsa.apply_sorsa(adapted, 16, train_tiny.BLOCK_LINEARS)
    merged = copy.deepcopy(adapted)
    sorsa.merge_sorsa(merged)
    idx = torch.randint(len(train_tiny.VOCAB), (8, tokens), device=device)

    def forward(model):
        def call():
            with torch.no_grad():
                model(idx)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return call

    times = interleaved_times({"plain": forward(plain), "merged": forward(merged), "adapter": forward(adapted)},
                              blocks=7, min_block_s=0.3)
    for name in ("merged", "adapter"):
        print(f"  {name:>8}: {times[name] / times['plain']:.3f}")
    return times["merged"] / times["plain"]


# ----------------------------------------------------------------------------- 3. initialization


def decaying_matrix(m, n, seed=0):
    """Singular values ~ (1 + i)^-0.5 on Gaussian bases: a slowly decaying, LLM-like spectrum
    (trained LLM weights show a power-law head over a noise bulk). Not exactly that spectrum:
    the bases are Gaussian, not orthogonal; accuracy is measured against this matrix's SVD."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    s = (1 + torch.arange(k, dtype=torch.float32)) ** -0.5
    return (torch.randn(m, k, generator=g) / m**0.5 * s) @ (torch.randn(k, n, generator=g) / n**0.5)


def init_section(shapes, rank, niters, device):
    print(f"\n3. Initialization at rank {rank}: exact SVD against randomized SVD (float32)")
    print(f"{'shape':>11} {'spectrum':>9} {'method':>10} {'seconds':>9} {'speed-up':>9} {'max rel err top-r':>18}")
    out = {}
    sorsa.svd_split(torch.randn(256, 256, device=device), 8, 2)  # load the LAPACK / cuSOLVER kernels first
    for m, n in shapes:
        for spectrum, W in (("decaying", decaying_matrix(m, n)), ("gaussian", torch.randn(m, n) / n**0.5)):
            W = W.to(device)
            timed = {}
            for niter in (None, *niters):
                start = time.perf_counter()
                _, S, _, _ = sorsa.svd_split(W, rank, niter)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                timed[niter] = (time.perf_counter() - start, S.double().cpu())
            exact_s, S_ref = timed[None]
            for niter, (sec, S) in timed.items():
                err = ((S - S_ref).abs() / S_ref).max().item()
                label = "exact" if niter is None else f"niter={niter}"
                print(f"{f'{m}x{n}':>11} {spectrum:>9} {label:>10} {sec:9.2f} {exact_s / sec:9.1f} {err:18.2e}")
                out[(m, n, spectrum, niter)] = (sec, exact_s / sec, err)
    return out


def bf16_step0_error(device, m=1024, rank=64, tokens=256):
    """A bf16 layer at step 0: its output's error against the exact x W_0^T, relative, beside the
    bf16 nn.Linear's own (both round x W_0 in bf16; SORSA adds the rounding of its two paths)."""
    torch.manual_seed(0)
    linear = nn.Linear(m, m, bias=False).to(device, torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(decaying_matrix(m, m).to(device))
    layer = sorsa.SORSALinear.from_linear(linear, rank)
    x = torch.randn(tokens, m, device=device).to(torch.bfloat16)
    exact = x.double() @ linear.weight.double().T
    with torch.no_grad():
        errors = {name: (torch.linalg.norm(f(x).double() - exact) / torch.linalg.norm(exact)).item()
                  for name, f in (("sorsa", layer), ("linear", linear))}
    print(f"   bf16 at step 0 ({m}x{m}, r {rank}, {tokens} inputs): |y - x W_0^T| / |x W_0^T| = {errors['sorsa']:.1e} "
          f"(nn.Linear in bf16: {errors['linear']:.1e})")
    return {"bf16_step0_rel_err": float(f"{errors['sorsa']:.2e}"), "bf16_linear_rel_err": float(f"{errors['linear']:.2e}")}


def llama_projection(init, square, mlp, niters):
    """Seconds to split all 224 linear layers of Llama 2 7B: 128 square ones, 96 of the MLP shape."""
    print("   projected for all 224 layers of Llama 2 7B (128 of 4096x4096, 96 of 4096x11008):")
    for niter in (None, *niters):
        total = 128 * init[(*square, "decaying", niter)][0] + 96 * init[(*mlp, "decaying", niter)][0]
        print(f"     {'exact' if niter is None else f'niter={niter}':>9}: {total / 60:7.1f} min")


# ----------------------------------------------------------------------------- 4. regularizer


VIEW_OPS = {"view", "_unsafe_view", "_reshape_alias", "reshape", "select", "slice", "transpose", "t", "permute",
            "expand", "unsqueeze", "squeeze", "detach", "alias", "as_strided", "unbind", "split", "diagonal"}


class LaunchCounter(TorchDispatchMode):
    """Counts the tensor operations that launch work (a kernel on a GPU); views are free."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.__name__.split(".")[0] not in VIEW_OPS
        return func(*args, **(kwargs or {}))


def eq4_layer_by_layer(layers, squared=False):
    """Eq. 4 as the paper writes it, one layer at a time, in float64: the oracle of the tests, and
    what the regularizer computed before it was grouped by shape (~25 operations per layer)."""
    total = 0
    for layer in layers:
        U, Vt = layer.U_p.double(), layer.Vt_p.double()
        eye = torch.eye(layer.rank, dtype=torch.float64, device=U.device)
        for term in (torch.linalg.matrix_norm(U.T @ U - eye), torch.linalg.matrix_norm(Vt @ Vt.T - eye)):
            total = total + (term.square() if squared else term)
    return total


def stand_in_layers(shapes, blocks, rank, divisor=1):
    """SORSA layers of the (in, out) shapes (each divided by `divisor`), `blocks` times over, their
    factor gradients already filled, as after the task loss's backward."""
    layers = []
    for _ in range(blocks):
        for i, o in shapes:
            i, o = max(rank, i // divisor), max(rank, o // divisor)
            layer = sorsa.SORSALinear(torch.randn(o, rank), torch.rand(rank), torch.randn(rank, i), torch.zeros(o, i))
            for p in (layer.U_p, layer.S_p, layer.Vt_p):
                p.grad = torch.zeros_like(p)
            layers.append(layer)
    return layers


def regularizer_op_count(layers, regularizer=sorsa.orthonormal_regularizer):
    """Operations launched by one forward + backward of the regularizer over `layers`."""
    with LaunchCounter() as counter:
        regularizer(layers).backward()
    return counter.count


def regularizer_overhead(device, model_cfg, batch_size):
    """(step time without, with the regularizer, the regularizer alone) for a TinyGPT training step."""
    torch.manual_seed(0)
    model = train_tiny.TinyGPT(model_cfg).to(device)
    sorsa.apply_sorsa(model, 8, train_tiny.BLOCK_LINEARS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    rng = random.Random(0)
    problems = [train_tiny.word_problem(rng) for _ in range(batch_size)]
    runtime = train_tiny.Runtime(device, amp=device.type == "cuda")  # bf16 on CUDA: no GradScaler

    def step(gamma):
        def call():  # train_tiny.finetune's step: the loss, its gradient clipped, Eq. 6's term, the update
            loss = train_tiny.batch_loss(model, problems, runtime)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            if gamma > 0:
                sorsa.add_regularizer_grad(model, gamma, 1e-3)
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
        return call

    times = interleaved_times({"without": step(0.0), "with": step(1e-4)}, blocks=9, min_block_s=0.3)  # gamma / lr = 0.1 (mean)
    alone = interleaved_times({"reg": lambda: sorsa.orthonormal_regularizer(model).backward()}, blocks=5)["reg"]
    return times["without"], times["with"], alone


def regularizer_section(device, quick):
    print("\n4. The regularizer (Eq. 4): launched operations, and its share of a training step")
    blocks, shapes = LLM_BLOCKS["Llama 2 7B"]
    layers = stand_in_layers(shapes, blocks, rank=4, divisor=256)  # the count does not depend on the sizes
    ops = regularizer_op_count(layers)
    literal = regularizer_op_count(layers, eq4_layer_by_layer)
    print(f"  Llama 2 7B's {len(layers)} adapted layers, forward + backward, factor gradients already filled: "
          f"{ops} operations grouped by shape, {literal} layer by layer")
    print(f"  (of which {2 * len(layers)} are the gradient accumulations any per-layer U_p and Vt_p need)")
    sizes = [("train_tiny's GPT, d 96, batch 32", train_tiny.GPTConfig(), 32)]
    if not quick:
        sizes.append(("same, d 512, batch 32", train_tiny.GPTConfig(d_model=512), 32))
    shares = []
    for label, model_cfg, batch_size in sizes:
        without, with_reg, alone = regularizer_overhead(device, model_cfg, batch_size)
        shares.append((alone / without, with_reg / without - 1))
        print(f"  {label:>32}: the regularizer alone (forward + backward) {alone * 1e3:.1f} ms = {shares[-1][0]:.1%} "
              f"of a {without * 1e3:.1f} ms step; steps with it {with_reg * 1e3:.1f} ms ({shares[-1][1]:+.1%}, "
              f"which this machine's noise of a few % blurs)")
    return {"reg_ops_llama2_7b": ops, "reg_ops_layer_by_layer": literal, "reg_share": round(shares[0][0], 3),
            "reg_overhead": round(shares[0][1], 3)}


# ----------------------------------------------------------------------------- 5. memory


def count(model):
    """(trainable parameters, AdamW state bytes: two float32 moments per trainable parameter)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, 2 * 4 * trainable


def resident_kib(field):
    """VmRSS (now) or VmHWM (the peak since the last reset) of this process, in KiB (Linux)."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))


def apply_growth(dtype, layers, size, rank, niter):
    """In a fresh process: how far apply_sorsa raised the peak resident memory above what the model
    of `layers` (size x size) weights already held; {growth, weights, factors} in bytes."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(size, size, bias=False, dtype=dtype) for _ in range(layers)])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the resident memory now
    before = resident_kib("VmRSS")
    start = time.perf_counter()
    sorsa.apply_sorsa(model, rank, niter=niter)
    seconds = time.perf_counter() - start
    growth = (resident_kib("VmHWM") - before) * 1024
    factors = sum(p.nbytes for _, m in sorsa.sorsa_modules(model) for p in (m.U_p, m.S_p, m.Vt_p, m.U_p0, m.S_p0, m.Vt_p0))
    return {"growth": growth, "weights": layers * size * size * dtype.itemsize, "factors": factors, "seconds": seconds}


def memory_section(device, quick):
    print("\n5. Memory: trainable parameters and AdamW state (two float32 moments each)")
    print(f"{'model, method':>26} {'trainable':>14} {'optimizer state':>16} {'extra frozen':>14}")
    tiny = train_tiny.TinyGPT(train_tiny.GPTConfig())
    rows = []
    for method in ("sorsa", "lora", "full"):
        rows.append(("TinyGPT", method, train_tiny.prepare(method, tiny.requires_grad_(False), train_tiny.Config())))
    llama = meta_blocks("Llama 2 7B")
    sorsa_llama = copy.deepcopy(llama)
    sorsa_integrations.apply_sorsa(sorsa_llama, 128)  # on the meta device: shapes only
    for label, method, model in rows + [("Llama 2 7B r=128", "sorsa", sorsa_llama)]:
        trainable, state = count(model)
        extra = sum(m.U_p0.numel() + m.S_p0.numel() + m.Vt_p0.numel() for _, m in sorsa.sorsa_modules(model))
        print(f"{f'{label}, {method}':>26} {trainable:14,} {state / 2**20:13.1f} MiB {extra:14,}")
    lora_llama = 32 * 128 * sum(i + o for i, o in LLM_BLOCKS["Llama 2 7B"][1])
    full_llama = sum(i * o for i, o in LLM_BLOCKS["Llama 2 7B"][1]) * 32 + LLAMA2_7B_OTHER_PARAMS
    for method, trainable in (("lora", lora_llama), ("full", full_llama)):
        print(f"{f'Llama 2 7B r=128, {method}':>26} {trainable:14,} {2 * 4 * trainable / 2**20:13.1f} MiB {0:14,}")
    print("   extra frozen: SORSA's copy of the initial factors, kept to export the learned change")
    print(f"\n   apply_sorsa's peak memory growth, each in a fresh process (peak RSS), rank 64, niter {HEADLINE_NITER}:")
    layers, size = (4, 2048) if quick else (16, 4096)
    out = {}
    ctx = multiprocessing.get_context("spawn")
    # glibc's malloc may keep freed blocks of up to 32 MiB in its heap, so that peak RSS follows
    # its history, not the tensors alive (bf16: 0.25x to 0.6x between identical runs); the child
    # maps every block over 1 MiB on its own, which it returns on free.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    for dtype, count_ in ((torch.float32, layers), (torch.bfloat16, 2 * layers)):  # both 1 GiB of weights (--quick: 64 MiB)
        with ctx.Pool(1) as pool:
            m = pool.apply(apply_growth, (dtype, count_, size, 64, HEADLINE_NITER))
        out[str(dtype).split(".")[1]] = m["growth"] / m["weights"]
        print(f"     {count_} {str(dtype).split('.')[1]} {size}x{size} layers ({m['weights'] / 2**30:.2f} GiB): "
              f"growth {m['growth'] / 2**20:7.1f} MiB = {m['growth'] / m['weights']:.3f}x the weights "
              f"(new factors {m['factors'] / 2**20:.1f} MiB, one layer {m['weights'] / count_ / 2**20:.0f} MiB); "
              f"{m['seconds']:.1f} s")
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    if quick:
        print("     (--quick: at 64 MiB of weights a constant ~40 MiB of library workspace dominates the ratio)")
    if device.type == "cuda":
        for method in ("sorsa", "lora", "full"):
            torch.cuda.reset_peak_memory_stats()
            model = train_tiny.prepare(method, tiny.to(device), train_tiny.Config())
            batch = train_tiny.problem_batch([train_tiny.word_problem(random.Random(0)) for _ in range(32)], device)
            train_tiny.answer_loss(model, batch, train_tiny.Runtime(device, amp=True)).backward()
            print(f"   peak GPU memory of a TinyGPT step, {method}: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    return {"apply_peak_over_weights": round(out["float32"], 3), "apply_peak_over_weights_bf16": round(out["bfloat16"], 3)}


# ----------------------------------------------------------------------------- 6. a Llama-shaped model against PEFT


LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {"bf16": (torch.bfloat16, False), "fp32_autocast": (torch.float32, True)}  # weights' dtype, autocast


def llama_run(device, config, rank, ids, setting, method, blocks=3):
    """Adapt a Llama model with random weights (method: sorsa, peft_pissa or peft_lora, all on
    the 7 projections at one rank) and time AdamW training steps at lr 3e-5. Prints and returns
    (seconds per step, peak GiB, seconds to adapt, peak growth while adapting / adapted weights, the
    regularizer's share of a step: add_regularizer_grad alone, its gradient included, over a whole step,
    timed in the same rounds; SORSA only); memory on CUDA only (nan on the CPU)."""
    import transformers
    dtype, amp = SETTINGS[setting]
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = amp
    torch.manual_seed(0)
    with torch.device(device):  # random weights made where they will live
        model = transformers.LlamaForCausalLM(config).to(dtype)
    adapted = sum(m.weight.nbytes for n, m in model.named_modules()
                  if isinstance(m, nn.Linear) and n.split(".")[-1] in LLAMA_TARGETS)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    start = time.perf_counter()
    if method == "sorsa":
        sorsa.apply_sorsa(model, rank, LLAMA_TARGETS, niter=4)
    else:
        import peft
        init = {"peft_pissa": "pissa_niter_4", "peft_lora": True}[method]
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                           target_modules=LLAMA_TARGETS, init_lora_weights=init))
    if cuda:
        torch.cuda.synchronize()
    adapt_s = time.perf_counter() - start
    growth = (torch.cuda.max_memory_allocated() - before) / adapted if cuda else float("nan")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.0)

    def step():  # the paper's recipe (Table 3): clipping at 1.0, the regularizer added after it
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if method == "sorsa":
            sorsa.add_regularizer_grad(model, gamma=6.25e-6, lr_max=3e-5)  # the paper's effective gamma (mean), lr
        opt.step()
        if cuda:
            torch.cuda.synchronize()

    def regularizer():  # what the step spends on Eq. 4, forward and backward
        sorsa.add_regularizer_grad(model, gamma=6.25e-6, lr_max=3e-5)
        if cuda:
            torch.cuda.synchronize()

    step()  # warm up: optimizer state, kernels
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timed = {"step": step, **({"regularizer": regularizer} if method == "sorsa" else {})}
    times = interleaved_times(timed, blocks=blocks, min_block_s=0.5)
    step_s, reg_share = times["step"], times.get("regularizer", math.nan) / times["step"]
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    memory = (f"peak {peak:6.2f} GiB, adapting {adapt_s:6.1f} s with peak growth {growth:.3f}x the adapted "
              f"weights" if cuda else f"adapting {adapt_s:5.2f} s (memory: on CUDA only)")
    share = f", regularizer {reg_share:.1%} of it" if method == "sorsa" else ""
    print(f"   {setting:>13} {method:>10}: step {step_s * 1e3:8.1f} ms{share}, {memory}")
    del model, opt
    torch.backends.cuda.matmul.allow_tf32 = False
    if cuda:
        torch.cuda.empty_cache()
    return step_s, peak, adapt_s, growth, reg_share


def llama_section(device, quick):
    """Training steps of a Llama-2-7B-shaped model with random weights (reduced on the CPU), SORSA
    against PEFT's PiSSA at the same rank, loaded in bf16 and loaded in FP32 under TF32 + bf16
    autocast (the paper's setting): step time, peak memory, adaptation time and peak growth."""
    try:
        import transformers
    except ImportError:
        print("\n6. Llama-shaped model against PEFT: skipped, transformers is not installed (pip install transformers peft)")
        return {}
    methods = ("sorsa", "peft_pissa") if importlib.util.find_spec("peft") else ("sorsa",)
    full = device.type == "cuda" and not quick
    dims = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                vocab_size=32000) if full else dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                                   num_attention_heads=4, vocab_size=1000)
    rank, batch, seq = (128, 2, 1024) if full else (8, 2, 64)
    config = transformers.LlamaConfig(**dims, max_position_embeddings=seq)
    label = "Llama-2-7B-shaped" if full else f"Llama-shaped, reduced ({dims['num_hidden_layers']} blocks of {dims['hidden_size']})"
    print(f"\n6. {label}, rank {rank} on the 7 projections, {batch} x {seq} tokens per step, AdamW at lr 3e-5")
    if len(methods) == 1:
        print("   peft is not installed: SORSA alone (pip install peft)")
    ids = torch.randint(config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    results = {(setting, method): llama_run(device, config, rank, ids, setting, method, blocks=3 if full else 2)
               for setting in SETTINGS for method in methods}
    summary = {}
    for setting in SETTINGS:
        if len(methods) == 2:
            (s_step, s_peak, *_), (p_step, p_peak, *_) = results[setting, "sorsa"], results[setting, "peft_pissa"]
            summary[f"llama_step_sorsa_over_peft_pissa_{setting}"] = round(s_step / p_step, 3)
            if device.type == "cuda":
                summary[f"llama_peak_sorsa_over_peft_pissa_{setting}"] = round(s_peak / p_peak, 3)
        if device.type == "cuda":
            summary[f"llama_apply_growth_over_weights_{setting}"] = round(results[setting, "sorsa"][3], 3)
        summary[f"llama_reg_share_{setting}"] = round(results[setting, "sorsa"][4], 4)  # fp32_autocast: under TF32
    summary["llama_shape"] = "7B" if full else "reduced"
    return summary


# ----------------------------------------------------------------------------- 7. distributed (under torchrun)


def distributed_section(quick):
    """DDP and FSDP2 on one small adapted model, 2 processes: what DDP broadcasts per step with
    the frozen tensors as buffers (as before) and as frozen parameters (now), step times against
    one process with the same global batch, and the base weights each rank holds under FSDP2.
    quick: layers of 256 instead of 1024, and the split's at a quarter of their width."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    DDP = nn.parallel.DistributedDataParallel
    sent = [0]
    real_broadcast = DDP._distributed_broadcast_coalesced

    def counting_broadcast(self, tensors, buffer_size, authoritative_rank=0):
        sent[0] += sum(t.nbytes for t in tensors)
        return real_broadcast(self, tensors, buffer_size, authoritative_rank)

    DDP._distributed_broadcast_coalesced = counting_broadcast

    width = 256 if quick else 1024

    def model(as_buffers=False):
        torch.manual_seed(0)
        m = nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.GELU()) for _ in range(6)])
        sorsa.apply_sorsa(m, 16)
        if as_buffers:  # the layer as it was: W_r, the initial factors and the bias as buffers
            for _, layer in sorsa.sorsa_modules(m):
                for key in ("W_r", "U_p0", "S_p0", "Vt_p0", "bias"):
                    tensor = getattr(layer, key).detach()
                    delattr(layer, key)
                    layer.register_buffer(key, tensor)
        return m

    x = torch.randn(64, width, generator=torch.Generator().manual_seed(1))
    local = x.chunk(world)[rank]

    def stepper(m, batch):
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

        def call():
            opt.zero_grad()
            sorsa.sorsa_loss(m(batch).square().mean(), m, 1e-4, 1e-3).backward()
            opt.step()
        return call

    ddp_now, ddp_before = DDP(model()), DDP(model(as_buffers=True))
    per_step = {}
    for label, m in (("now", ddp_now), ("before", ddp_before)):
        sent[0] = 0
        stepper(m, local)()
        per_step[label] = sent[0]
    def median_time(call, reps=10):  # a fixed count: every rank must make the same collective calls
        call()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            call()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    times = {}
    for _ in range(3):  # interleaved rounds, so that drifts hit both alike
        for label, m in (("ddp_now", ddp_now), ("ddp_before", ddp_before)):
            times.setdefault(label, []).append(median_time(stepper(m, local)))
    times = {k: statistics.median(v) for k, v in times.items()}
    single = None
    if rank == 0:  # one process, the whole global batch, while rank 1 waits
        single = median_time(stepper(model(), x), reps=30)
    dist.barrier()
    fsdp = model()
    full_bytes = sum(l.W_r.nbytes for _, l in sorsa.sorsa_modules(fsdp))
    for block in fsdp:
        fully_shard(block, shard_placement_fn=sorsa_integrations.fsdp_shard_placement(fsdp))
    fully_shard(fsdp)
    local_bytes = sum(l.W_r.to_local().nbytes for _, l in sorsa.sorsa_modules(fsdp))
    split = sharded_split(rank, world, 4 if quick else 1)
    if rank == 0:
        print(f"7. {world} gloo processes, 6 SORSA layers of {width}x{width} at r 16, global batch 64 (each rank 32):")
        print(f"   DDP broadcast per step: {per_step['before'] / 2**20:.1f} MiB with the frozen tensors as buffers "
              f"(before), {per_step['now'] / 2**20:.1f} MiB as frozen parameters (now)")
        print(f"   step: DDP now {times['ddp_now'] * 1e3:.1f} ms, DDP before {times['ddp_before'] * 1e3:.1f} ms, "
              f"one process with the global batch {single * 1e3:.1f} ms")
        print(f"   FSDP2: each rank holds {local_bytes / 2**20:.1f} MiB of the {full_bytes / 2**20:.1f} MiB of W_r")
        print(json.dumps({"ddp_broadcast_mib_before": round(per_step["before"] / 2**20, 1),
                          "ddp_broadcast_mib_now": round(per_step["now"] / 2**20, 1),
                          "ddp_step_over_single": round(times["ddp_now"] / single, 3),
                          "ddp_before_over_now": round(times["ddp_before"] / times["ddp_now"], 3),
                          "fsdp_W_r_per_rank_fraction": round(local_bytes / full_bytes, 3), "world": world, **split}))
    sorsa_integrations.end_distributed()


def base_rows(layer, rows, out):
    """Fill out (len(rows), n) with those rows of a stand-in base weight, each from a seed of its own: a rank makes
    its shard alone, in place (rows made apart and stacked would leave the heap in pieces the split then reuses)."""
    gen = torch.Generator()
    for row, i in zip(out, rows):
        torch.randn(row.shape, generator=gen.manual_seed(100_000 * layer + i), out=row)


def steal_ticks():
    """(steal, all) CPU ticks of the host so far (/proc/stat): time the hypervisor gave our CPUs to others."""
    ticks = [int(v) for v in open("/proc/stat").readline().split()[1:9]]  # user .. steal (guest is inside user)
    return ticks[7], sum(ticks)


def sharded_split(rank, world, divisor=1, layers=12):
    """Adapting after sharding (sorsa_integrations.split_sharded), exact (1024x1024 layers at r 16) and randomized
    (niter 2; 2048x2048 at r 32: at 1024 its 6 all-reduces a turn, ~2 ms each on gloo here, outweigh its work), on a model
    made on the meta device whose ranks each make only their rows of W_0: each rank's peak memory during the
    split against the model's size, the bytes each rank sends (exact: its shards to their owners; randomized: its
    parts of the sketch's products, all-reduced; broadcast: the factors, once per other rank),
    and the split's time against one process splitting the whole model (sorsa.apply_sorsa on
    rank 0): wall-clock, and CPU time (the work each rank did, whatever the host lent), with the share of the
    CPUs the host took away meanwhile (steal). One thread per process (torchrun's default); before measuring,
    every process has run both SVDs at this size and one split (LAPACK's and gloo's one-time set-up). divisor:
    the layers' width and rank divided by it (4: bench.py --quick)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    names = [str(i) for i in range(layers)]
    cases = [(label, niter, size // divisor, r // divisor)
             for label, niter, size, r in (("exact", None, 1024, 16), ("randomized", 2, 2048, 32))]
    ctypes.CDLL(None).mallopt(-3, 1 << 16)  # glibc: M_MMAP_THRESHOLD fixed at 64 KiB, so freed tensors leave
    # the resident memory at once and its peak counts what was alive together, not the heap's fragments
    for _, niter, size, r in cases:
        sorsa.svd_split(torch.randn(size, size), r, niter)  # LAPACK's first calls set themselves up
    sent = [0]
    real_send, real_broadcast, real_all_reduce = dist.send, dist.broadcast, dist.all_reduce

    # Counting wrappers with torch.distributed's own signatures: the companion passes the group positionally.
    def send(tensor, dst, *args, **kw):
        sent[0] += tensor.nbytes
        return real_send(tensor, dst, *args, **kw)

    def broadcast(tensor, src, *args, **kw):
        sent[0] += tensor.nbytes * (world - 1) if dist.get_rank() == src else 0
        return real_broadcast(tensor, src, *args, **kw)

    def all_reduce(tensor, *args, **kw):  # a ring all-reduce's share: each rank sends 2 (world - 1) / world of it
        sent[0] += tensor.nbytes * 2 * (world - 1) // world
        return real_all_reduce(tensor, *args, **kw)

    def split_once(niter, size, r):
        """(wall seconds, CPU seconds, the host's steal share, (bytes its shards hold, bytes the peak grew), bytes
        sent) of this rank's part of one split_sharded, on a fresh model."""
        with torch.device("meta"):
            model = nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in range(layers)])
        sorsa_integrations.apply_sorsa(model, r, names)  # shapes only: the companion adapts a meta model
        for layer in model:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.to_local().zero_()  # every shard resident before the measure, so none is counted twice
            for i, (_, mod) in enumerate(sorsa.sorsa_modules(model)):
                rows = sorsa_integrations._part(torch.arange(size), mod.W_r).tolist()  # this rank's, as FSDP2 cuts
                base_rows(i, rows, mod.W_r.to_local())
        holds = sum(p.to_local().nbytes for p in model.parameters())  # W_r shards (a 1/world of the model) and factors
        sent[0] = 0
        dist.send, dist.broadcast, dist.all_reduce = send, broadcast, all_reduce
        dist.barrier()
        ctypes.CDLL(None).malloc_trim(0)  # free memory back to the system: the resident memory is what is alive
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak (VmHWM) from here
        before, steal = resident_kib("VmRSS"), steal_ticks()
        start, cpu = time.perf_counter(), time.process_time()
        sorsa_integrations.split_sharded(model, niter)
        cpu = time.process_time() - cpu
        dist.barrier()
        seconds = time.perf_counter() - start
        stolen = [a - b for a, b in zip(steal_ticks(), steal)]
        dist.send, dist.broadcast, dist.all_reduce = real_send, real_broadcast, real_all_reduce
        return seconds, cpu, stolen[0] / max(1, stolen[1]), (holds, (resident_kib("VmHWM") - before) * 1024), sent[0]

    def one_process(niter, size, r):
        """(wall, CPU) seconds one process takes to split the whole model (sorsa.apply_sorsa), on rank 0 while the
        others wait."""
        seconds = None
        if rank == 0:
            whole = nn.Sequential(*[nn.Linear(size, size, bias=False) for _ in range(layers)]).requires_grad_(False)
            for i, layer in enumerate(whole):
                base_rows(i, range(size), layer.weight)
            start, cpu = time.perf_counter(), time.process_time()
            sorsa.apply_sorsa(whole, r, names, niter=niter)
            seconds = time.perf_counter() - start, time.process_time() - cpu
        dist.barrier()
        return seconds

    summary = {}
    for label, niter, size, r in cases:
        split_once(niter, size, r)  # gloo's first messages of these sizes set themselves up: not the split's cost
        model_bytes = layers * size * size * 4
        rounds = [(split_once(niter, size, r), one_process(niter, size, r)) for _ in range(3)]  # the fastest of 3
        best = [min(range(3), key=lambda i: rounds[i][0][0])]
        dist.broadcast_object_list(best, src=0)  # rank 0's fastest round: every rank reports that one
        best = best[0]
        seconds, cpu, steal, peak, sent_bytes = rounds[best][0]
        cpus, peaks, sends = [None] * world, [None] * world, [None] * world
        for gathered, mine in ((cpus, cpu), (peaks, peak), (sends, sent_bytes)):
            dist.all_gather_object(gathered, mine)
        if rank == 0:
            single, single_cpu = min(t for _, t in rounds)
            print(f"   adapting after sharding ({label} SVD), {layers} layers of {size}x{size} float32 at r {r} "
                  f"({model_bytes / 2**20:.0f} MiB): split in {seconds:.2f} s by {world} ranks, {single:.2f} s by "
                  f"one process alone: {seconds / single:.2f} (the host took {steal:.0%} of the CPUs meanwhile); CPU "
                  f"time per rank / one process's: {', '.join(f'{c / single_cpu:.2f}' for c in cpus)}")
            layer_bytes = model_bytes / layers
            for k, (holds, grew) in enumerate(peaks):
                print(f"     rank {k}: peak {(holds + grew) / 2**20:.1f} MiB, {(holds + grew) / model_bytes:.3f} of the "
                      f"model: its shards ({holds / layer_bytes:.1f} layers' worth, factors included) and "
                      f"{grew / layer_bytes:.2f} layers' worth more during the split; sent {sends[k] / 2**20:.1f} MiB")
            summary |= {f"split_{label}_ranks_over_one": round(seconds / single, 3), f"split_{label}_steal": round(steal, 3),
                        f"split_{label}_cpu_ranks_over_one": [round(c / single_cpu, 3) for c in cpus]}
        summary |= {f"split_{label}_model_mib": round(model_bytes / 2**20, 1),
                    f"split_{label}_peak_over_model": [round(sum(p) / model_bytes, 3) for p in peaks],
                    f"split_{label}_extra_layers": [round(grew / (model_bytes / layers), 2) for _, grew in peaks],
                    f"split_{label}_sent_mib": [round(b / 2**20, 1) for b in sends]}
    return summary


# ----------------------------------------------------------------------------- 8. against PEFT (--peft)


class OneLayer(nn.Module):
    """A model of one linear layer, named proj, for PEFT's get_peft_model."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def top_singular_values(B, A):
    """Singular values of the rank-r product B A, B (m, r), A (r, n), from its r x r core."""
    core = torch.linalg.qr(B.double()).R @ torch.linalg.qr(A.double().T).R.T  # B A = Q_B core Q_A^T
    return torch.linalg.svdvals(core)


def peft_section(device, quick):
    """SORSA against PEFT (where installed), each in bf16: one layer's forward + backward against
    PEFT's LoRA layer and a frozen nn.Linear; a whole training step of a 2-block Llama-shaped model
    against PEFT LoRA at the same rank; a layer's initialization by svd_split(niter=3) against PEFT's
    init_lora_weights="pissa_niter_4" (time, and the top-r singular values' error). Full sizes on
    CUDA, reduced on the CPU or with --quick (then the ratios only show that it runs)."""
    import peft
    import transformers
    full = device.type == "cuda" and not quick
    d, rank, token_counts = (4096, 128, (16, 2048, 8192)) if full else (512, 16, (16, 256, 1024))
    print(f"\n8. Against PEFT {peft.__version__}, bf16 base, rank {rank}")
    print(f"   one {d}x{d} layer, forward + backward, time / SORSA:")
    summary = {}
    for tokens in token_counts:
        torch.manual_seed(0)
        with torch.device(device):
            linear = nn.Linear(d, d, bias=False, dtype=torch.bfloat16).requires_grad_(False)
        layer = sorsa.SORSALinear.from_linear(linear, rank, niter=4)
        lora = peft.get_peft_model(OneLayer(copy.deepcopy(linear)), peft.LoraConfig(
            r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=["proj"]))
        forms = {"sorsa": (layer, [layer.U_p, layer.S_p, layer.Vt_p]),
                 "peft_lora": (lora, [p for p in lora.parameters() if p.requires_grad]), "linear": (linear, [])}
        with torch.device(device):
            times = time_forms(forms, tokens, d, dtype=torch.bfloat16)
        print(f"     {tokens:>5} tokens: PEFT LoRA {times['peft_lora'] / times['sorsa']:5.2f}, "
              f"nn.Linear {times['linear'] / times['sorsa']:5.2f}, SORSA {times['sorsa'] * 1e3:8.2f} ms")
        summary[f"peft_layer_sorsa_over_lora_{tokens}tok"] = round(times["sorsa"] / times["peft_lora"], 3)

    hidden, mlp, batch, seq = (4096, 11008, 2, 1024) if full else (256, 688, 2, 64)
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2,
                                      num_attention_heads=hidden // 128 if full else 4, vocab_size=32000 if full else 1000,
                                      max_position_embeddings=seq)
    print(f"   a training step of a 2-block Llama-shaped model (hidden {hidden}, MLP {mlp}), {batch} x {seq} tokens:")
    ids = torch.randint(config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
    runs = {method: llama_run(device, config, rank, ids, "bf16", method, blocks=5 if full else 2)
            for method in ("sorsa", "peft_lora")}
    summary["peft_llama2blk_step_sorsa_over_lora"] = round(runs["sorsa"][0] / runs["peft_lora"][0], 3)
    if device.type == "cuda":
        summary["peft_llama2blk_peak_sorsa_over_lora"] = round(runs["sorsa"][1] / runs["peft_lora"][1], 3)

    m, n = (11008, 4096) if full else (2752, 1024)
    W = decaying_matrix(m, n).to(device)  # an LLM-like spectrum (section 3)
    exact = torch.linalg.svdvals(W.double())[:128]

    def init(method):
        holder = OneLayer(nn.Linear(n, m, bias=False, device=device))
        with torch.no_grad():
            holder.proj.weight.copy_(W)
        if method == "sorsa":
            sorsa.apply_sorsa(holder, 128, ["proj"], niter=HEADLINE_NITER)
            B, A = holder.proj.U_p * holder.proj.S_p, holder.proj.Vt_p
        else:
            holder = peft.get_peft_model(holder, peft.LoraConfig(r=128, lora_alpha=128, lora_dropout=0.0,
                                                                 target_modules=["proj"], init_lora_weights="pissa_niter_4"))
            inner = holder.base_model.model.proj
            B, A = inner.lora_B["default"].weight, inner.lora_A["default"].weight  # scaling = alpha / r = 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        return B.detach(), A.detach()

    times = interleaved_times({method: lambda method=method: init(method) for method in ("sorsa", "peft_pissa")},
                              blocks=3, min_block_s=0.0)
    print(f"   initializing one {m}x{n} layer at rank 128, LLM-like spectrum (seconds, max relative error of the top 128):")
    for method, label in (("sorsa", f"svd_split(niter={HEADLINE_NITER})"), ("peft_pissa", "PEFT pissa_niter_4")):
        err = ((top_singular_values(*init(method)).cpu() - exact.cpu()).abs() / exact.cpu()).max().item()
        print(f"     {label:>22}: {times[method]:7.3f} s, error {err:.2e}")
        summary[f"peft_init_err_{method}"] = float(f"{err:.2e}")
    summary["peft_init_time_sorsa_over_pissa"] = round(times["sorsa"] / times["peft_pissa"], 3)
    return summary


# ----------------------------------------------------------------------------- 9. W_r in NF4: a 7B model on 16 GB


GB = 1e9  # the "16 GB" of a GPU's label
LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                 vocab_size=32000)


def llama2_7b_state_bytes(rank=128):
    """What training Llama 2 7B at `rank` on the 7 projections holds, counted from the shapes of a stand-in built
    on the meta device: {base_bf16, base_nf4, trained, initial, gradients, adamw} in bytes, the frozen rest
    (embeddings, head, norms) in bf16 in both bases, the factors and their state in float32."""
    model = meta_blocks("Llama 2 7B")
    sorsa_integrations.apply_sorsa(model, rank)  # on meta: shapes only
    layers = [layer for _, layer in sorsa.sorsa_modules(model)]
    rest = LLAMA2_7B_OTHER_PARAMS * 2
    trained = sum(p.numel() for layer in layers for p in (layer.U_p, layer.S_p, layer.Vt_p)) * 4
    return {"base_bf16": sum(layer.W_r.numel() for layer in layers) * 2 + rest,
            "base_nf4": sum(sorsa_nf4.nf4_bytes(layer.W_r.shape) for layer in layers) + rest,
            "trained": trained, "initial": trained, "gradients": trained, "adamw": 2 * trained}


def saved_bytes(model, ids):
    """Bytes autograd saves for the backward of model's loss on ids: the activations, each storage once,
    parameters (and the NF4 weights, which are parameters) left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters() if not sorsa_nf4.is_quantized(p)}
    storages = {}

    def pack(t):
        if not sorsa_nf4.is_quantized(t) and t.untyped_storage().data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    return sum(storages.values())


def llama_activation_bytes(dims, rank, batch, seq):
    """Activations of a `batch` x `seq`-token step of a bf16 Llama of `dims` adapted at `rank`, in bytes: {(block,
    checkpointing): a block's, ("rest", checkpointing): the embeddings', head's and loss's}. Measured as the bytes
    autograd saves, on the CPU at 4 and 8 tokens a sequence with 1 and 2 blocks, and extrapolated: what it saves is
    linear in the tokens (the attention kernels keep no T x T scores)."""
    import transformers
    measured = {}
    for blocks in (1, 2):
        torch.manual_seed(0)
        config = transformers.LlamaConfig(**{**dims, "num_hidden_layers": blocks}, max_position_embeddings=seq)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).train()
        sorsa.apply_sorsa(model, rank, LLAMA_TARGETS, niter=0)  # the factors' values do not matter here
        for checkpointing in (False, True):
            if checkpointing:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            for tokens in (4, 8):
                measured[blocks, checkpointing, tokens] = saved_bytes(model, torch.zeros(batch, tokens, dtype=torch.long))
        del model
    out = {}
    for checkpointing in (False, True):
        at = {blocks: measured[blocks, checkpointing, 4] + (seq - 4) * (measured[blocks, checkpointing, 8]
              - measured[blocks, checkpointing, 4]) / 4 for blocks in (1, 2)}  # extrapolated to seq tokens
        out["block", checkpointing], out["rest", checkpointing] = at[2] - at[1], 2 * at[1] - at[2]
    return out


class StandInCheckpoint(collections.abc.Mapping):
    """A checkpoint of random bf16 weights for a model on the meta device, each tensor made on `device` when it is
    read, as sorsa_nf4.LazyCheckpoint reads one from disk: no process ever holds the whole base."""

    def __init__(self, model, device):
        self.shapes = {k: v.shape for k, v in model.state_dict().items()}
        self.device = device

    def __getitem__(self, key):
        if key.endswith("norm.weight"):
            return torch.ones(self.shapes[key], dtype=torch.bfloat16, device=self.device)
        seeded = torch.Generator(device=self.device).manual_seed(zlib.crc32(key.encode()))
        W = torch.randn(self.shapes[key], generator=seeded, device=self.device) * 0.02
        return W.to(torch.bfloat16)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def nf4_adapt_growth(layers, size, rank, niter):
    """In a fresh process: a model of `layers` bf16 (size x size) layers on the meta device, adapted by
    sorsa_nf4.apply_sorsa from a stand-in checkpoint made a layer at a time; {peak, after, quantized, layer} in
    bytes: the peak resident growth, the growth after, the adapted model counted from its tensors, one bf16 layer."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(size, size, bias=False, dtype=torch.bfloat16) for _ in range(layers)])
    checkpoint = StandInCheckpoint(model, torch.device("cpu"))
    sorsa_nf4.quantize(torch.randn(256, 256))  # torchao's code paths loaded before the measure
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the resident memory now
    before = resident_kib("VmRSS")
    sorsa_nf4.apply_sorsa(model, rank, niter=niter, base_state=checkpoint)
    peak, after = (resident_kib(field) - before for field in ("VmHWM", "VmRSS"))
    quantized = sum(sorsa_nf4.nf4_bytes(m.W_r.shape) + sum(p.nbytes for p in (m.U_p, m.S_p, m.Vt_p, m.U_p0, m.S_p0,
                    m.Vt_p0)) for _, m in sorsa.sorsa_modules(model))
    return {"peak": peak * 1024, "after": after * 1024, "quantized": quantized, "layer": size * size * 2}


def nf4_layer_times(device, d, rank, tokens):
    """Forward + backward seconds of one (d x d) SORSA layer in bf16 at `rank`, W_r in NF4 and in bf16."""
    torch.manual_seed(0)
    with torch.device(device):
        linear = nn.Linear(d, d, bias=False, dtype=torch.bfloat16)
    dense = sorsa.SORSALinear.from_linear(linear, rank, niter=2)
    quantized = sorsa.SORSALinear(dense.U_p, dense.S_p, dense.Vt_p, sorsa_nf4.quantize(dense.W_r))
    forms = {name: (layer, [layer.U_p, layer.S_p, layer.Vt_p]) for name, layer in (("nf4", quantized), ("bf16", dense))}
    with torch.device(device):
        return time_forms(forms, tokens, d, dtype=torch.bfloat16)


def nf4_recipe(device, dims, rank, batch, seq, steps=3):
    """docs/scaling.md's 16 GB recipe on a Llama of `dims` with random weights: built on meta, adapted by
    sorsa_nf4.apply_sorsa a layer at a time from a stand-in checkpoint made on the device, then AdamW steps of
    batch x seq tokens with gradient checkpointing. Prints and returns seconds to adapt, its peak, seconds a step
    and the training peak (memory on CUDA; nan on the CPU)."""
    import transformers
    cuda = device.type == "cuda"
    config = transformers.LlamaConfig(**dims, max_position_embeddings=seq)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    with torch.device(device):  # computed at construction, not in checkpoints (non-persistent buffers)
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    sorsa_nf4.apply_sorsa(model, rank, LLAMA_TARGETS, niter=4, device=device,
                          base_state=StandInCheckpoint(model, device))
    if cuda:
        torch.cuda.synchronize()
    adapt_s, adapt_peak = time.perf_counter() - start, torch.cuda.max_memory_allocated() if cuda else math.nan
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-5, weight_decay=0.0)
    ids = torch.randint(config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)

    def step():  # the paper's recipe: clip 1.0, then the regularizer (Eq. 6), once a step
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        sorsa.add_regularizer_grad(model, gamma=6.25e-6, lr_max=3e-5)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
    step()  # AdamW's state made
    if any(p.grad is None for p in params):  # checkpointing that cut the factors off would train nothing
        raise RuntimeError("the recipe's step left factors without a gradient")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = interleaved_times({"step": step}, blocks=steps, min_block_s=0.0)["step"]
    peak = torch.cuda.max_memory_allocated() if cuda else math.nan
    memory = f": {'within' if peak <= 16 * GB else 'above'} 16 GB" if cuda else "; memory on CUDA only"
    print(f"   the recipe, {dims['num_hidden_layers']} blocks of {dims['hidden_size']}, r {rank}, {batch} x {seq} tokens, "
          f"gradient checkpointing: adapted in {adapt_s:.1f} s (peak {adapt_peak / GB:.2f} GB), a step "
          f"{step_s:.2f} s (peak {peak / GB:.2f} GB){memory}")
    return adapt_s, adapt_peak, step_s, peak


def nf4_activations(training, quick):
    """Llama 2 7B's activations of 2 x 512 tokens, measured (llama_activation_bytes), without and with gradient
    checkpointing, and whether they fit in 16 GB beside the training state (`training` bytes); with quick, smaller
    blocks counted 32 times, and no verdict."""
    summary = {}
    dims = LLAMA2_7B if not quick else {**LLAMA2_7B, "hidden_size": 1024, "intermediate_size": 2752,
                                        "num_attention_heads": 8}
    print("   activations of 2 x 512 tokens in bf16, measured as saved-tensor bytes (4 and 8 tokens, 1 and 2 blocks "
          f"of hidden {dims['hidden_size']}, MLP {dims['intermediate_size']}) and extrapolated:")
    act = llama_activation_bytes(dims, 128, 2, 512)
    for checkpointing in (False, True):
        block, rest = act["block", checkpointing], act["rest", checkpointing]
        total = 32 * block + rest + (act["block", False] if checkpointing else 0)  # backward recomputes a block
        fits = training + total <= 16 * GB
        verdict = "" if quick else f": {'fits' if fits else 'does not fit'} in 16 GB"
        recompute = f" + {act['block', False] / 2**20:.1f} MiB, one block recomputed" if checkpointing else ""
        print(f"     gradient checkpointing {'on ' if checkpointing else 'off'}: 32 blocks x {block / 2**20:6.1f} MiB"
              f"{recompute} + {rest / 2**20:.1f} MiB embeddings, head and loss = {total / GB:5.2f} GB; with the "
              f"training state {(training + total) / GB:5.2f} GB{verdict}")
        on = "on" if checkpointing else "off"
        if not quick:
            summary.update({f"nf4_7b_activations_gb_ckpt_{on}": round(total / GB, 2), f"nf4_7b_fits_16gb_ckpt_{on}": fits})
    if quick:
        print("     (--quick: smaller blocks than 7B's, counted 32 times, so no verdict; the full run measures 7B's)")
    return summary


def nf4_section(device, quick):
    """Llama 2 7B at r = 128 with W_r in NF4 (sorsa_nf4), counted from its shapes: the training state and the
    activations of a 2 x 512-token batch against a 16 GB GPU. Measured: one layer's forward + backward with W_r in
    NF4 over in bf16; the adaptation's peak memory over the quantized model's (CPU, in a fresh process); the 16 GB
    recipe itself (a 7B-shaped model on CUDA, reduced on the CPU or with --quick)."""
    print("\n9. W_r in NF4 (sorsa_nf4): Llama 2 7B at r = 128 on a 16 GB GPU")
    state = llama2_7b_state_bytes(128)
    for key, label in (("base_bf16", "base in bf16 (the 7 projections; embeddings, head, norms)"),
                       ("base_nf4", "base with W_r in NF4, scales included (the rest in bf16)"),
                       ("trained", "trained factors U_p, S_p, Vt_p (float32)"), ("initial", "their initial copies"),
                       ("gradients", "their gradients"), ("adamw", "AdamW's two moments")):
        print(f"   {label:>60}: {state[key] / GB:6.2f} GB")
    training = state["base_nf4"] + state["trained"] + state["initial"] + state["gradients"] + state["adamw"]
    print(f"   {'training state with W_r in NF4':>60}: {training / GB:6.2f} GB "
          f"(in bf16: {(training - state['base_nf4'] + state['base_bf16']) / GB:.2f} GB)")
    summary = {"nf4_7b_base_bf16_gb": round(state["base_bf16"] / GB, 2), "nf4_7b_base_nf4_gb": round(state["base_nf4"] / GB, 2),
               "nf4_7b_training_state_gb": round(training / GB, 2)}
    if importlib.util.find_spec("transformers"):
        summary.update(nf4_activations(training, quick))
    d, rank, tokens = (512, 16, 256) if quick else (1024, 64, 256)  # the CPU's bf16 matmuls are slow: 15 s a 2048 step
    if device.type == "cuda" and not quick:
        d, rank, tokens = 4096, 128, 2048
    times = nf4_layer_times(device, d, rank, tokens)
    summary["nf4_layer_time_over_bf16"] = round(times["nf4"] / times["bf16"], 3)
    print(f"   one {d}x{d} layer at r {rank}, {tokens} tokens, forward + backward in bf16: W_r in NF4 "
          f"{times['nf4'] * 1e3:.2f} ms, in bf16 {times['bf16'] * 1e3:.2f} ms: {summary['nf4_layer_time_over_bf16']}x")
    layers, size = (8, 1024) if quick else (8, 4096)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(2**20)  # freed blocks go back to the system (memory_section says why)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        m = pool.apply(nf4_adapt_growth, (layers, size, 64, HEADLINE_NITER))
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    summary["nf4_adapt_peak_over_quantized"] = round(m["peak"] / m["quantized"], 2)
    print(f"   adapting {layers} bf16 {size}x{size} layers at r 64 from a checkpoint read a layer at a time (peak RSS, "
          f"a fresh process): peak growth {m['peak'] / 2**20:.1f} MiB = {summary['nf4_adapt_peak_over_quantized']}x the "
          f"quantized model ({m['quantized'] / 2**20:.1f} MiB counted, {m['after'] / 2**20:.1f} MiB resident after), "
          f"{(m['peak'] - m['quantized']) / m['layer']:.1f} bf16 layers' worth above it (the whole base: {layers}); "
          f"torchao's quantizer compares 2^20 weights at a time with its 16 levels, 64 MiB in bf16 at any layer size")
    if importlib.util.find_spec("transformers"):
        full = device.type == "cuda" and not quick
        dims = LLAMA2_7B if full else dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2,
                                           num_attention_heads=4, vocab_size=1000)  # 768: NF4's blocks tile it
        adapt_s, adapt_peak, step_s, peak = nf4_recipe(device, dims, 128 if full else 8, 2, 512 if full else 64)
        summary.update({"nf4_recipe_adapt_s": round(adapt_s, 2), "nf4_recipe_step_s": round(step_s, 3),
                        "nf4_recipe_shape": "7B" if full else "reduced"})
        if device.type == "cuda":
            summary.update({"nf4_recipe_adapt_peak_gb": round(adapt_peak / GB, 2), "nf4_recipe_peak_gb": round(peak / GB, 2)})
    return summary


# ----------------------------------------------------------------------------- main


def argument_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer cases, under a minute")
    parser.add_argument("--distributed", action="store_true",
                        help="section 7 alone: torchrun --standalone --nproc_per_node 2 bench.py --distributed "
                             "(with --quick: its layers 4x narrower)")
    parser.add_argument("--peft", action="store_true", help="section 8 alone: SORSA against PEFT (needs transformers, peft)")
    parser.add_argument("--nf4", action="store_true",
                        help="section 9 alone: W_r in NF4, Llama 2 7B on a 16 GB GPU (needs torchao; transformers for "
                             "the activations and the recipe)")
    parser.add_argument("--llama", action="store_true",
                        help="section 6 alone: a Llama-shaped model against PEFT's PiSSA (needs transformers, peft)")
    return parser


def main(argv=None):
    parser = argument_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this PyTorch sees no CUDA GPU")
    if args.distributed:
        if "WORLD_SIZE" not in os.environ:
            parser.error("--distributed runs under torchrun: torchrun --standalone --nproc_per_node 2 bench.py --distributed")
        return distributed_section(args.quick)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device {device}{' (' + name + ')' if device.type == 'cuda' else ''}, "
          f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    start = time.time()
    if args.peft:
        try:
            summary = peft_section(device, args.quick)
        except ImportError as e:
            sys.exit(f"bench.py --peft needs transformers and peft beside the project ({e}): pip install transformers peft")
        print(f"\ntotal {time.time() - start:.0f} s")
        print(json.dumps({**summary, "device": name, "quick": args.quick}))
        return
    if args.nf4:
        summary = nf4_section(device, args.quick)  # without torchao, an ImportError that says how to install it
        print(f"\ntotal {time.time() - start:.0f} s")
        print(json.dumps({**summary, "device": name, "quick": args.quick}))
        return
    if args.llama:
        summary = llama_section(device, args.quick)
        print(f"\ntotal {time.time() - start:.0f} s")
        print(json.dumps({**summary, "device": name, "quick": args.quick}))
        return
    if args.quick:
        big, cases = 1024, [(512, 16, 16), (1024, 128, 16), (1024, 128, 2048)]
        square, mlp, niters = (1024, 1024), (1024, 2752), (2, 3, 4)
    else:
        big = 4096
        cases = [(m, r, t) for m in (1024, 4096) for r in (16, 64, 128) for t in (16, 256, 2048)]
        square, mlp, niters = (4096, 4096), (4096, 11008), (2, 3, 4)
    layer = layer_section(cases, device)
    merged_over_linear = merge_section(device, 256 if args.quick else 512, 128 if args.quick else 256)
    init = init_section([square, mlp], 128, niters, device)
    step0 = bf16_step0_error(device)
    if not args.quick:
        llama_projection(init, square, mlp, niters)
    reg = regularizer_section(device, args.quick)
    memory = memory_section(device, args.quick)
    llama = llama_section(device, args.quick)
    print(f"\ntotal {time.time() - start:.0f} s")
    summary = {
        "sorsa_over_lora": round(1 / statistics.median(v["lora"] for v in layer.values()), 3),
        "official_over_sorsa_16tok": round(layer[(big, 128, 16)]["appendixA"], 2),
        "official_over_sorsa_2048tok": round(layer[(big, 128, 2048)]["appendixA"], 2),
        "merged_over_linear": round(merged_over_linear, 3),
        f"fast_svd_speedup_{mlp[0]}x{mlp[1]}": round(init[(*mlp, "decaying", HEADLINE_NITER)][1], 1),
        "fast_svd_top_r_rel_err": float(f"{init[(*mlp, 'decaying', HEADLINE_NITER)][2]:.2e}"),
        **step0, **reg, **memory, **llama,
        "niter": HEADLINE_NITER, "device": name,
        "quick": args.quick,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
