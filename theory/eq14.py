"""Theorem 5.5, Eq. 14: after some time, kappa(W_p^reg) < kappa(W_p^unreg). When does it hold?

Claim, in our words: with the orthonormal regularizer, W_p = U_p diag(S_p) V_p^T ends better
conditioned than without it.

What this script measures: Eq. 14 at the end of training, on the random tasks of
theory.condition_number (same recipe: AdamW, cosine schedule with 3% warm-up, clipping 1.0,
Eq. 6, S_p trained), for pretrained weights of five spectra and three gamma/lr; then on the
18 adapted layers of train_tiny's GPT, with train_tiny's own recipe (seeds 0 and 1). For each
layer where Eq. 14 fails it says whether the unregularized run narrowed W_p's spectrum
(kappa(W_p^unreg) < kappa(W_p,0)), the mechanism seen in the small tasks.

    python -m theory.eq14        (about 6 minutes on a 2-core CPU; the tiny GPT's base model is cached)
"""

import statistics

import torch

import sorsa
import theory
from theory.condition_number import GAMMA_OVER_LR, Task, kappa, run

SPECTRA = ("gaussian", "exp0.01", "exp0.1", "power0.5", "power1")


def eq14_at_end(task, seeds, gamma_over_lr):
    """[(kappa(W_p^reg) / kappa(W_p^unreg) at the end, kappa(W_p,0), kappa(W_p^unreg)) per task]."""
    rows = []
    for seed in seeds:
        unreg, reg = run(task, seed, 0.0), run(task, seed, gamma_over_lr * task.lr)
        rows.append((reg[1.0]["kappa_Wp"] / unreg[1.0]["kappa_Wp"], unreg[0.0]["kappa_Wp"], unreg[1.0]["kappa_Wp"]))
    return rows


def tiny_gpt_layers(cfg, seeds=(0, 1)):
    """Per seed and adapted layer of train_tiny's GPT (cfg: a train_tiny.Config, its recipe and gamma/lr):
    (name, kappa(W_p,0), kappa(W_p^unreg), kappa(W_p^reg)) at the end of fine-tuning."""
    import train_tiny
    runtime = train_tiny.start_runtime(cfg)
    base, _, data, _ = train_tiny.prepare_base(cfg, 0, runtime)
    out = {}
    for seed in seeds:
        kappas = {}
        for method in ("sorsa_g0", "sorsa"):
            lr = train_tiny.METHODS[method].lr_scale * cfg.lr
            _, model = train_tiny.finetune(method, lr, base, data, cfg, seed, runtime)
            for name, layer in sorsa.sorsa_modules(model):
                W_p = (layer.U_p * layer.S_p) @ layer.Vt_p
                W_p0 = (layer.U_p0 * layer.S_p0) @ layer.Vt_p0
                kappas.setdefault(name, [kappa(W_p0, layer.rank)]).append(kappa(W_p, layer.rank))
        out[seed] = [(name, *values) for name, values in kappas.items()]
    return out


def main(quick=False):
    tasks = 2 if quick else 20
    task = Task(steps=30) if quick else Task()
    torch.manual_seed(0)
    print(f"({torch.get_num_threads()} CPU threads, torch {torch.__version__})")
    print(f"Eq. 14 at the end of training, {tasks} tasks per cell (W_0 {task.m}x{task.n}, r={task.r}, "
          f"{task.steps} AdamW steps): tasks where it holds, median kappa(W_p^reg) / kappa(W_p^unreg)")
    print(f"{'spectrum':>10}" + "".join(f"{f'gamma/lr {g:g}':>22}" for g in GAMMA_OVER_LR)
          + f"{'narrowed, failures':>22}")
    for spectrum in SPECTRA:
        cells, narrowed = [], []
        for gamma_over_lr in GAMMA_OVER_LR:
            rows = eq14_at_end(Task(spectrum=spectrum, steps=task.steps), range(tasks), gamma_over_lr)
            ratios = [r for r, _, _ in rows]
            cells.append(f"{sum(r < 1 for r in ratios):>2}/{tasks} {statistics.median(ratios):7.3f}")
            narrowed += [k_end < k_0 for r, k_0, k_end in rows if r >= 1]
        print(f"{spectrum:>10}" + "".join(f"{c:>22}" for c in cells) + f"{sum(narrowed):>12}/{len(narrowed)}")
    print("  narrowed: failures of Eq. 14 (all gamma/lr) where the unregularized run ended with a smaller "
          "kappa(W_p) than it started with")
    import train_tiny
    cfg = train_tiny.Config(**theory.TINY_RUNS) if quick else train_tiny.Config()
    print(f"\nEq. 14 on train_tiny's GPT (18 adapted layers, {cfg.steps} steps, gamma/lr = {cfg.gamma_ratio:g} "
          "on the mean), per seed:")
    for seed, rows in tiny_gpt_layers(cfg).items():
        failing = [(name, k0, unreg, reg) for name, k0, unreg, reg in rows if reg >= unreg]
        print(f"  seed {seed}: held in {len(rows) - len(failing)}/{len(rows)} layers; median kappa_reg / kappa_unreg "
              f"{statistics.median(reg / unreg for _, _, unreg, reg in rows):.3f}")
        for name, k0, unreg, reg in failing:
            print(f"    fails at {name}: kappa(W_p,0) {k0:.3f}, unreg {unreg:.3f} "
                  f"({'narrowed' if unreg < k0 else 'widened'}), reg {reg:.3f}")


if __name__ == "__main__":
    main(theory.quick_flag(__doc__))
