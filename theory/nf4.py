"""Claim 10 (QPiSSA's, from the PiSSA paper, for SORSA's split): the residual W_r quantizes to NF4 with
less error than W_0. When?

Claim, in our words: after the split (Eqs. 1-2) the frozen residual W_r = W_0 - U_p diag(S_p) Vt_p can be
stored in 4 bits (NF4, sorsa_nf4.py) losing less than W_0 itself would, so that SORSA on a 4-bit residual
starts nearer the pretrained model than adapters on a 4-bit base (QLoRA) do: at step 0 the layer's error
is W_r - Q(W_r) (its factors are exact), QLoRA's W_0 - Q(W_0).

What this script measures:
  1. rho = ||Q(W_r) - W_r||_* / ||Q(W_0) - W_0||_* (nuclear norm, as the PiSSA paper; Frobenius beside)
     for float32 weights of five spectra at r = 1, 8, 64, 128, over seeds (mean, std, 95% interval), and
     the prediction ||W_r||_F / ||W_0||_F: NF4 scales each block of 64 weights by its absmax, so its error
     is a fixed share (about 9%) of the size of entries spread like a Gaussian's, and the split removes
     the share sum_{i<=r} sigma_i^2 of W_0's squared size;
  2. the same on the 18 adapted layers of train_tiny's pretrained GPT at its rank 8;
  3. weights NF4 already represents well: one already on the NF4 grid (a dequantized 4-bit model), a
     90%-sparse one (pruned; NF4 stores 0 exactly), a ternary one;
  4. what training on Q(W_r) costs on the demo (train_tiny's recipe, its seeds): SORSA with an NF4 residual
     against SORSA on the same base in bf16, both computed in float32 (bf16 matmuls are 5x slower on our
     CPU; the residual is all that differs); and the NF4-trained adapter on the full-precision base it was
     made from (unmerged and merged), and merged into the quantized model, against the quantized model
     itself: accuracy, eval loss and the rise of the held-out loss (forgetting), paired by seed.

    python -m theory.nf4        (about 40 minutes on a 2-core CPU, 30 of them part 4; the tiny GPT's base
                                 model is cached under runs/)
"""

import copy
import dataclasses
import math
import statistics
from unittest import mock

import torch

import sorsa
import sorsa_nf4
import theory
from theory.comparison import interval, verdict
from theory.condition_number import spectrum_weight

SPECTRA = ("power0", "power0.3", "power0.6", "power1", "gaussian")  # power0: a flat spectrum
DEMO_SCALER_BLOCK = 48  # the tiny GPT's 96 x 96 and 96 x 384 layers have 144 and 576 blocks of 64


def nuclear(E):
    return torch.linalg.matrix_norm(E.double(), "nuc").item()


def quantization_error(W, scaler_block_size=sorsa_nf4.SCALER_BLOCK_SIZE):
    """Q(W) - W (m, n) in float64, for W (m, n) quantized in its own dtype."""
    Q = sorsa_nf4.quantize(W, scaler_block_size=scaler_block_size)
    return Q.to(torch.float64) - W.double()


def error_ratio(W_0, rank, scaler_block_size=sorsa_nf4.SCALER_BLOCK_SIZE):
    """(rho nuclear, rho Frobenius, ||W_r||_F / ||W_0||_F) of a weight W_0 (m, n) split at rank r (Eq. 2)."""
    *_, W_r = sorsa.svd_split(W_0, rank)  # in W_0's dtype, as the layer holds it
    E_0, E_r = (quantization_error(W, scaler_block_size) for W in (W_0, W_r))
    return (ratio(nuclear(E_r), nuclear(E_0)), ratio(E_r.norm().item(), E_0.norm().item()),
            (W_r.double().norm() / W_0.double().norm()).item())


def ratio(a, b):
    """a / b, infinite where b is 0 (W_0 exactly on the NF4 grid)."""
    return a / b if b > 0 else math.inf


def random_spectra(size, ranks, seeds):
    """{(spectrum, r): [(rho_nuc, rho_F, prediction) per seed]} for float32 weights (size, size)."""
    out = {}
    for spectrum in SPECTRA:
        for seed in seeds:
            W_0 = spectrum_weight(size, size, seed, spectrum).float()  # a float32 checkpoint
            for r in ranks:
                out.setdefault((spectrum, r), []).append(error_ratio(W_0, r))
    return out


def on_the_grid(W):
    """W (m, n) replaced by its NF4 dequantization: a weight already on the 4-bit grid."""
    return sorsa_nf4.quantize(W).to(W.dtype)


def special_weights(size, seed=0):
    """{name: W_0 (size, size) float32} that NF4 already represents well, each from a (1 + i)^-0.6 spectrum."""
    W = spectrum_weight(size, size, seed, "power0.6").float()
    keep = torch.rand(size, size, generator=torch.Generator().manual_seed(seed)) < 0.1
    ternary = torch.sign(W) * (W.abs() > W.abs().median())
    return {"on the NF4 grid": on_the_grid(W), "90% sparse": W * keep, "ternary": ternary}


def cell(values, fmt="{:.3f}"):
    """mean +- std [95% interval of the mean] of values."""
    mean, std, (low, high) = interval(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} +- {fmt.format(std)} [{fmt.format(low)}, {fmt.format(high)}]"


def tiny_gpt_rows(cfg):
    """[(name, rho_nuc, rho_F, prediction)] of the adapted layers of train_tiny's pretrained GPT at cfg.rank."""
    import train_tiny
    base, _ = train_tiny.base_model(cfg, 0, train_tiny.start_runtime(cfg))
    rows = []
    for name in train_tiny.target_names(base, cfg.targets.split(",")):
        W_0 = base.get_submodule(name).weight.detach()
        rows.append((name, *error_ratio(W_0, cfg.rank, DEMO_SCALER_BLOCK)))
    return rows


# ----------------------------------------------------------------------------- 4. training on Q(W_r), the demo


def nf4_method():
    """train_tiny's SORSA, W_r in NF4: its Method, for train_tiny.METHODS (patched in for the run)."""
    import train_tiny

    def adapt(model, rank, targets):
        sorsa_nf4.apply_sorsa(model, rank, targets, scaler_block_size=DEMO_SCALER_BLOCK)
    return dataclasses.replace(train_tiny.METHODS["sorsa"], adapt=adapt)


def scores(model, data, runtime):
    """{accuracy, eval_loss, forget_loss} of a model on the demo's test problems and held-out text."""
    import train_tiny
    loss, accuracy = train_tiny.evaluate(model, data.test, runtime)
    return {"accuracy": accuracy, "eval_loss": loss, "forget_loss": train_tiny.forgetting(model, data, runtime)[0]}


def bf16_base(cfg, runtime):
    """(train_tiny's pretrained base with its weights rounded to bf16, as a bf16 checkpoint holds them, kept in
    float32 so that the CPU computes in float32; its EvalData, forgetting measured from it)."""
    import train_tiny
    base, _, data, _ = train_tiny.prepare_base(cfg, 0, runtime)
    rounded = base.to(torch.bfloat16).to(torch.float32)
    heldout = data.heldout
    skills = train_tiny.pretraining_skills(rounded, heldout, runtime)
    return rounded, dataclasses.replace(data, base_skills=skills)


def demo_costs(cfg, seeds):
    """{variant: [scores per seed]}: SORSA on the bf16 base, SORSA with W_r in NF4 as trained, its merge, and
    its adapter on the full-precision (bf16) base, unmerged and merged; each seed's runs on the same batches."""
    import train_tiny
    runtime = train_tiny.start_runtime(cfg)
    base, data = bf16_base(cfg, runtime)
    lr = train_tiny.METHODS["sorsa"].lr_scale * cfg.lr
    out = {}
    with mock.patch.dict(train_tiny.METHODS, {"sorsa_nf4": nf4_method()}):
        for seed in seeds:
            _, bf16 = train_tiny.finetune("sorsa", lr, base, data, cfg, seed, runtime)
            _, nf4 = train_tiny.finetune("sorsa_nf4", lr, base, data, cfg, seed, runtime)
            adapter = sorsa.adapter_state_dict(nf4)
            on_base = copy.deepcopy(base)  # the full-precision base: W_r + W_p,t
            sorsa.load_adapter(on_base, adapter)
            variants = {"bf16 SORSA": bf16, "NF4: Q(W_r) + W_p": nf4, "NF4 adapter on the bf16 base": on_base}
            for name, model in list(variants.items()):
                out.setdefault(name, []).append(scores(model, data, runtime))
            for name in ("NF4: Q(W_r) + W_p", "NF4 adapter on the bf16 base"):  # merged: plain nn.Linear
                sorsa.merge_sorsa(variants[name])
                out.setdefault(f"{name}, merged", []).append(scores(variants[name], data, runtime))
    return out


def paired(out, a, b, key):
    """The paired difference a - b of `key` over seeds: (mean, (low, high)) and its verdict."""
    diffs = [x[key] - y[key] for x, y in zip(out[a], out[b])]
    mean, _, (low, high) = interval(diffs)
    return mean, (low, high), verdict(low, high)


def main(quick=False):
    import train_tiny
    size, ranks, seeds = (128, (1, 8, 32), range(2)) if quick else (1024, (1, 8, 64, 128), range(3))
    print(f"({torch.get_num_threads()} CPU threads, torch {torch.__version__})")
    print(f"1. rho = ||Q(W_r) - W_r||_* / ||Q(W_0) - W_0||_*, NF4 (blocks of 64, scaler blocks of 256), "
          f"float32 {size}x{size}, {len(seeds)} seeds: mean +- std [95% interval]; Frobenius; ||W_r||_F / ||W_0||_F")
    print(f"{'spectrum':>10} {'r':>4} {'rho (nuclear)':>32} {'rho (Frobenius)':>16} {'prediction':>11}")
    for (spectrum, r), rows in random_spectra(size, ranks, seeds).items():
        print(f"{spectrum:>10} {r:4d} {cell([x[0] for x in rows]):>32} {statistics.mean(x[1] for x in rows):16.3f}"
              f" {statistics.mean(x[2] for x in rows):11.3f}")
    print("   power<a>: singular values (1 + i)^-a on random orthogonal vectors (power0: flat); gaussian: i.i.d. entries")

    cfg = train_tiny.Config(**theory.TINY_RUNS, curve=False) if quick else train_tiny.Config(curve=False)
    rows = tiny_gpt_rows(cfg)
    print(f"\n2. train_tiny's pretrained GPT, its {len(rows)} adapted layers at r = {cfg.rank} "
          f"(scaler blocks of {DEMO_SCALER_BLOCK}): rho (nuclear), rho (Frobenius), prediction")
    for name, rho, rho_f, pred in rows:
        print(f"   {name:>22} {rho:7.3f} {rho_f:7.3f} {pred:7.3f}")
    print(f"   all layers: rho {cell([r[1] for r in rows])}, largest |rho_F - prediction| "
          f"{max(abs(r[2] - r[3]) for r in rows):.3f}")

    print(f"\n3. Weights NF4 already represents well ({size}x{size}, float32): rho at r = 1, {ranks[1]}, {ranks[-1]}")
    for name, W_0 in special_weights(size).items():
        cells = [error_ratio(W_0, r)[0] for r in (1, ranks[1], ranks[-1])]
        print(f"   {name:>16}: " + ", ".join(f"{c:.3g}" for c in cells)
              + f"   (||Q(W_0) - W_0||_F / ||W_0||_F = {(quantization_error(W_0).norm() / W_0.norm()).item():.2e})")

    demo_seeds = range(1) if quick else range(5)
    print(f"\n4. Training on Q(W_r): train_tiny's recipe ({cfg.steps} steps, rank {cfg.rank}), {len(demo_seeds)} seeds, "
          "float32 compute; accuracy, eval loss, rise of the held-out loss: mean +- std [95% interval]")
    out = demo_costs(cfg, demo_seeds)
    for name, runs in out.items():
        print(f"   {name:>36}: accuracy {cell([r['accuracy'] for r in runs])}, eval loss "
              f"{cell([r['eval_loss'] for r in runs])}, forgetting {cell([r['forget_loss'] for r in runs])}")
    print("   paired differences (95% interval of the mean), and what the interval establishes:")
    for a, b in (("NF4: Q(W_r) + W_p", "bf16 SORSA"), ("NF4 adapter on the bf16 base", "NF4: Q(W_r) + W_p"),
                 ("NF4 adapter on the bf16 base, merged", "NF4: Q(W_r) + W_p"),
                 ("NF4: Q(W_r) + W_p, merged", "NF4: Q(W_r) + W_p")):
        parts = []
        for key, fmt in (("accuracy", "{:+.3f}"), ("eval_loss", "{:+.4f}"), ("forget_loss", "{:+.3f}")):
            mean, (low, high), word = paired(out, a, b, key)
            parts.append(f"{key} {fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}] {word}")
        print(f"   {a} minus {b}: " + "; ".join(parts))


if __name__ == "__main__":
    main(theory.quick_flag(__doc__))
