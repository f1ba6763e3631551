"""What SORSA costs: against LoRA, plain linear layers and the other ways to compute it.

Every number is a ratio of two times measured in one run on one machine, the variants
interleaved block by block (absolute CPU times mean little; on a GPU they do). Sections:
  1. adapter layer forward + backward: ours, LoRA, frozen nn.Linear, Eq. 3 literally, and
     the authors' layer (the full (U_p * S_p) @ V_p^T built on every forward)
  2. inference after merge_sorsa against the same model built of plain nn.Linear
  3. initialization: exact against randomized SVD, time and accuracy; all of Llama 2 7B
  4. the regularizer's share of a training step of train_tiny's GPT
  5. memory: trainable parameters and optimizer state; peak GPU memory on CUDA

    python bench.py            # about 8 minutes on a 2-core CPU
    python bench.py --quick    # under a minute: smaller shapes, fewer cases
    python bench.py --device cuda

The last line printed is one JSON object with the headline ratios.
"""

import argparse
import copy
import json
import random
import statistics
import time

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import sorsa
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


def regularizer_op_count(layers):
    """Operations launched by one forward + backward of the regularizer over `layers`."""
    with LaunchCounter() as counter:
        sorsa.orthonormal_regularizer(layers).backward()
    return counter.count



def regularizer_overhead(device, model_cfg, batch_size):
    """(step time without, with the regularizer, the regularizer alone) for a TinyGPT training step."""
    torch.manual_seed(0)
    model = train_tiny.TinyGPT(model_cfg).to(device)
    sorsa.apply_sorsa(model, 8, train_tiny.BLOCK_LINEARS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    rng = random.Random(0)
    batch = train_tiny.problem_batch([train_tiny.word_problem(rng) for _ in range(batch_size)], device)

    def step(gamma):
        def call():
            train_tiny.train_step(model, opt, params, batch, gamma, 1e-3, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return call

    times = interleaved_times({"without": step(0.0), "with": step(1e-4)}, blocks=9, min_block_s=0.3)
    alone = interleaved_times({"reg": lambda: sorsa.orthonormal_regularizer(model).backward()}, blocks=5)["reg"]
    return times["without"], times["with"], alone


def regularizer_section(device, quick):
    print("\n4. A training step of train_tiny's GPT (18 block linears adapted, r 8), with / without Eq. 4")
    sizes = [("train_tiny's GPT, d 96, batch 32", train_tiny.GPTConfig(), 32)]
    if not quick:
        sizes.append(("same, d 512, batch 32", train_tiny.GPTConfig(d_model=512), 32))
    overheads = []
    for label, model_cfg, batch_size in sizes:
        without, with_reg, alone = regularizer_overhead(device, model_cfg, batch_size)
        overheads.append(with_reg / without - 1)
        print(f"  {label:>32}: step {without * 1e3:6.1f} ms without, {with_reg * 1e3:6.1f} ms with: "
              f"overhead {overheads[-1]:5.1%} (the regularizer alone, forward + backward: {alone * 1e3:.1f} ms)")
    return overheads[0]


# ----------------------------------------------------------------------------- 5. memory


def count(model):
    """(trainable parameters, AdamW state bytes: two float32 moments per trainable parameter)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, 2 * 4 * trainable


def memory_section(device):
    print("\n5. Memory: trainable parameters and AdamW state (two float32 moments each)")
    print(f"{'model, method':>26} {'trainable':>14} {'optimizer state':>16} {'extra frozen':>14}")
    tiny = train_tiny.TinyGPT(train_tiny.GPTConfig())
    rows = []
    for method in ("sorsa", "lora", "full"):
        model, _ = train_tiny.prepare(method, tiny.requires_grad_(False), train_tiny.Config())
        rows.append(("TinyGPT", method, model))
    llama = meta_blocks("Llama 2 7B")
    sorsa_llama = copy.deepcopy(llama)
    sorsa.apply_sorsa(sorsa_llama, 128)
    for label, method, model in rows + [("Llama 2 7B r=128", "sorsa", sorsa_llama)]:
        trainable, state = count(model)
        extra = sum(m.U_p0.numel() + m.S_p0.numel() + m.Vt_p0.numel() for _, m in sorsa.sorsa_modules(model))
        print(f"{f'{label}, {method}':>26} {trainable:14,} {state / 2**20:13.1f} MiB {extra:14,}")
    lora_llama = 32 * 128 * sum(i + o for i, o in LLM_BLOCKS["Llama 2 7B"][1])
    full_llama = sum(i * o for i, o in LLM_BLOCKS["Llama 2 7B"][1]) * 32 + LLAMA2_7B_OTHER_PARAMS
    for method, trainable in (("lora", lora_llama), ("full", full_llama)):
        print(f"{f'Llama 2 7B r=128, {method}':>26} {trainable:14,} {2 * 4 * trainable / 2**20:13.1f} MiB {0:14,}")
    print("   extra frozen: SORSA's copy of the initial factors, kept to export the learned change")
    if device.type == "cuda":
        for method in ("sorsa", "lora", "full"):
            torch.cuda.reset_peak_memory_stats()
            model, lr = train_tiny.prepare(method, tiny.to(device), train_tiny.Config())
            batch = train_tiny.problem_batch([train_tiny.word_problem(random.Random(0)) for _ in range(32)], device)
            train_tiny.answer_loss(model, batch, device).backward()
            print(f"   peak GPU memory of a TinyGPT step, {method}: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")


# ----------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and fewer cases, under a minute")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this PyTorch sees no CUDA GPU")
    device = torch.device(args.device)
    print(f"device {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    start = time.time()
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
    if not args.quick:
        llama_projection(init, square, mlp, niters)
    reg_overhead = regularizer_section(device, args.quick)
    memory_section(device)
    print(f"\ntotal {time.time() - start:.0f} s")
    summary = {
        "sorsa_over_lora": round(1 / statistics.median(v["lora"] for v in layer.values()), 3),
        "official_over_sorsa_16tok": round(layer[(big if not args.quick else 1024, 128, 16)]["appendixA"], 2),
        "official_over_sorsa_2048tok": round(layer[(big if not args.quick else 1024, 128, 2048)]["appendixA"], 2),
        "merged_over_linear": round(merged_over_linear, 3),
        f"fast_svd_speedup_{mlp[0]}x{mlp[1]}": round(init[(*mlp, "decaying", HEADLINE_NITER)][1], 1),
        "fast_svd_top_r_rel_err": float(f"{init[(*mlp, 'decaying', HEADLINE_NITER)][2]:.2e}"),
        "reg_overhead": round(reg_overhead, 3),
        "niter": HEADLINE_NITER, "device": device.type, "quick": args.quick,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
