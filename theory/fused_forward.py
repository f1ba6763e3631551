"""Eq. 3 at t = 0 and Appendix A: the forms of the SORSA forward pass, side by side.

Claims, in our words:
  Eq. 3   At initialization a SORSA layer computes exactly what the pretrained layer did.
  App. A  x W_r + x (U_p * S_p) V_p^T equals Eq. 3, and replacing the matrix product
          U_p diag(S_p) by the elementwise U_p * S_p makes SORSA as fast as LoRA.

What this script measures: the largest output difference of each form from nn.Linear
at initialization (float64, exact and fast SVD), then the time of a forward + backward
pass of each form on the CPU, as a ratio to our forward (sorsa.SORSALinear). The forms:
  literal   W_r + U_p @ diag(S_p) @ V_p^T built on every call (Eq. 3 as written)
  appendixA W_r + (U_p * S_p) @ V_p^T built on every call (Eq. 15, and the authors' layer)
  ours      x W_r^T + ((x V_p) * S_p) U_p^T: never builds an (m, n) matrix
  lora      x W_0^T + (x A^T) B^T with the same rank: the target speed
  linear    x W_0^T alone, frozen: the floor

    python -m theory.fused_forward          (under a minute on a 2-core CPU)
"""

import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import theory
from sorsa import SORSALinear


def literal_eq3(layer, x):
    """Eq. 3 as written: the diagonal as a matrix, the full (m, n) weight on every call."""
    W = layer.W_r + layer.U_p @ torch.diag(layer.S_p) @ layer.Vt_p  # (m, n)
    return F.linear(x, W, layer.bias)


def appendix_a(layer, x):
    """Eq. 15: the diagonal as an elementwise scale, but still the full (m, n) product per call."""
    return F.linear(x, layer.W_r, layer.bias) + F.linear(x, (layer.U_p * layer.S_p) @ layer.Vt_p)


def make_forms(m, n, r, seed=0):
    """{name: (forward(x), trainable tensors)} for one (m, n) pretrained weight at rank r."""
    torch.manual_seed(seed)
    base = nn.Linear(n, m)
    layer = SORSALinear.from_linear(base, r)
    A = nn.Parameter(torch.randn(r, n) / n**0.5)  # LoRA: B A with B = 0 at init, as usual
    B = nn.Parameter(torch.zeros(m, r))
    base.requires_grad_(False)
    factors = [layer.U_p, layer.S_p, layer.Vt_p]
    return {
        "literal": (lambda x: literal_eq3(layer, x), factors),
        "appendixA": (lambda x: appendix_a(layer, x), factors),
        "ours": (layer, factors),
        "lora": (lambda x: base(x) + F.linear(F.linear(x, A), B), [A, B]),
        "linear": (base, []),
    }


def init_errors(m=96, n=64, r=16):
    """Max |form(x) - nn.Linear(x)| at initialization in float64, for the exact and a fast SVD."""
    torch.manual_seed(0)
    base = nn.Linear(n, m, dtype=torch.float64)
    x = torch.randn(32, n, dtype=torch.float64)
    out = {}
    for niter in (None, 2):
        layer = SORSALinear.from_linear(base, r, niter)
        for name, form in (("literal", literal_eq3), ("appendixA", appendix_a), ("ours", lambda l, x: l(x))):
            out[(name, niter)] = (form(layer, x) - base(x)).abs().max().item()
    return out


def interleaved_times(fns, blocks=3, min_block_s=0.1):
    """Median seconds per call of each fn(); the fns take turns block by block, so that the
    machine's drifts hit all of them alike, and each block lasts at least min_block_s."""
    reps = {}
    for name, fn in fns.items():  # warm up, then size the blocks from one timed call
        fn()
        start = time.perf_counter()
        fn()
        reps[name] = max(1, math.ceil(min_block_s / (time.perf_counter() - start)))
    samples = {name: [] for name in fns}
    for _ in range(blocks):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(reps[name]):
                fn()
            samples[name].append((time.perf_counter() - start) / reps[name])
    return {name: statistics.median(t) for name, t in samples.items()}


def time_forms(forms, tokens, n, blocks=3, dtype=torch.float32):
    """Median seconds of one forward + backward (to the input and the trainable tensors) per form."""
    x = torch.randn(tokens, n, dtype=dtype, requires_grad=True)

    def step(forward, params):
        def call():
            torch.autograd.grad(forward(x).sum(), [x, *params])
            if x.is_cuda:  # wait for the GPU, or only the launch is timed
                torch.cuda.synchronize()
        return call

    return interleaved_times({name: step(*form) for name, form in forms.items()}, blocks)


def main(quick=False):
    print("Eq. 3 at t = 0: max |form(x) - W_0 x| in float64 (96x64, r=16)")
    for (name, niter), err in init_errors().items():
        print(f"  {name:>9}  {'exact SVD' if niter is None else f'fast SVD, niter={niter}':>18}: {err:.1e}")
    print(f"\nForward + backward time as a ratio to ours ({torch.get_num_threads()} CPU threads)")
    names = ("literal", "appendixA", "ours", "lora", "linear")
    print(f"{'m x n, r, tokens':>22}" + "".join(f"{n:>10}" for n in names) + f"{'ours (ms)':>11}")
    cases = [((1024, 1024), 64, 16), ((1024, 1024), 64, 2048), ((2048, 2048), 128, 16), ((2048, 2048), 128, 512)]
    for (m, n), r, tokens in [((256, 256), 16, 16)] if quick else cases:
        times = time_forms(make_forms(m, n, r), tokens, n)
        print(f"{f'{m}x{n}, {r}, {tokens}':>22}" + "".join(f"{times[k] / times['ours']:10.2f}" for k in names)
              + f"{times['ours'] * 1e3:11.2f}")
    m = 256 if quick else 2048
    print(f"\nThe step Appendix A changes, alone ({m} x 128 factor):")
    U, S = torch.randn(m, 128), torch.rand(128)
    for label, fn in (("U_p @ diag(S_p)", lambda: U @ torch.diag(S)), ("U_p * S_p", lambda: U * S),
                      (f"(U_p * S_p) @ V_p^T, {m}x{m}", lambda: (U * S) @ U.T)):
        start = time.perf_counter()
        for _ in range(20):
            fn()
        print(f"  {label:>32}: {(time.perf_counter() - start) / 20 * 1e3:8.3f} ms")


if __name__ == "__main__":
    main(theory.quick_flag(__doc__))
