"""Claim 9 (Sec. 6): SORSA fine-tunes better than PiSSA, LoRA and full fine-tuning.

The paper compares the methods at the learning rates of its Table 3, SORSA's 1.5x the others', and
each method's accuracy moves steeply with its rate: such a comparison cannot separate the method
from its rate. What is measured here, on train_tiny.py's task and with its pieces:
  1. every method at every listed rate, seeds 0 .. seeds-1 of base model 0 (SORSA at the listed
     rate too, gamma = gamma_ratio * lr: 0.4 by default, with L_reg the mean over factor matrices,
     not the paper's nominal 13.3 nor its runs' effective 0.208; docs/gamma.md), each method's rate
     chosen on validation, never on test;
  2. with --refine, the chosen rate / sqrt 2 and * sqrt 2 added, and the choice made again;
  3. with --final_seeds N --base_seeds 0,1,2, each method at its chosen rate on N new seeds of every
     base model, compared with SORSA pair by pair (same base, same seed): the mean difference, its
     95% t-interval, and a verdict only where the interval excludes 0;
  and lambda_max, the largest eigenvalue of the task loss's Hessian at the start, per method.

    python -m theory.comparison --lrs 2e-3,4e-3,8e-3,1.6e-2,3.2e-2,6.4e-2 --steps 100 --seeds 3 --refine \\
        --final_seeds 10 --base_seeds 0,1,2 --methods sorsa,sorsa_g0,pissa,lora,full    (26-63 min, 2-core CPU)

Every finished run goes to {out}/sweep.jsonl under a key of the settings that make it the same
experiment, so an interrupted comparison resumes where it stopped. docs/comparison.md has the results.
"""

import argparse
import dataclasses
import hashlib
import random
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch.nn.attention import SDPBackend, sdpa_kernel

import sorsa_integrations as si
import train_tiny


@dataclass
class Comparison(train_tiny.Config):
    lrs: str = ""  # every method (SORSA too) at each, e.g. "1e-3,2e-3,4e-3"; gamma = gamma_ratio * lr
    refine: bool = False  # then also each method's best lr / sqrt 2 and * sqrt 2
    final_seeds: int = 0  # then each method at its chosen lr on this many new seeds, on every base
    base_seeds: str = "0"  # pretraining seeds of the base models; the first chooses the learning rates
    val_size: int = 200  # validation problems, apart from the test set and from training: they choose each lr
    out: str = "runs/comparison"  # its own: the demo's runs/tiny/log.jsonl starts anew with each demo run
    curve: bool = False  # each run's test scores at its end only

    def sweep_lrs(self):
        return [float(v) for v in self.lrs.split(",")]

    def base_seed_list(self):
        return [int(v) for v in self.base_seeds.split(",")]


# ----------------------------------------------------------------------------- statistics


def t_975(df):
    """The 97.5% quantile of Student's t with df degrees of freedom (12.71 for 1, 2.26 for 9), by
    bisection on its distribution function, the density integrated by Simpson's rule."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def mass(t, n=400):  # P(0 < T < t)
        f = [c * (1 + (t * i / n) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return t / (3 * n) * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))
    lo, hi = 0.0, 64.0
    for _ in range(50):
        lo, hi = ((lo + hi) / 2, hi) if mass((lo + hi) / 2) < 0.475 else (lo, (lo + hi) / 2)
    return (lo + hi) / 2


def interval(values):
    """(mean, standard deviation, the 95% confidence interval of the mean as (low, high)) over runs:
    mean +- t_975(n - 1) std / sqrt(n). With one run the interval is unbounded."""
    mean, std = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
    half = t_975(len(values) - 1) * std / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return mean, std, (mean - half, mean + half)


def verdict(low, high):
    """What a paired comparison's 95% interval (low, high) establishes about the mean difference."""
    return "higher" if low > 0 else "lower" if high < 0 else "not established"


def ci_cell(runs, key, fmt):
    """train_tiny.cell's mean +- std over the runs, with the 95% interval of the mean."""
    _, _, (low, high) = interval([r[key] for r in runs])
    return train_tiny.cell(runs, key, fmt) + (f" [{fmt.format(low)}, {fmt.format(high)}]" if len(runs) > 1 else "")


def best_lr(by_lr):
    """The learning rate with the best mean validation accuracy (then the lower validation loss)."""
    def score(lr):
        loss = statistics.mean(r["val_loss"] for r in by_lr[lr])
        return statistics.mean(r["val_accuracy"] for r in by_lr[lr]), -loss if math.isfinite(loss) else -math.inf
    return max(by_lr, key=score)


def hessian_lambda_max(method, base, problems, cfg, runtime, iters=60):
    """The largest eigenvalue of the task loss's Hessian with respect to a method's trainable
    parameters at the start of fine-tuning (float32, no autocast, one fixed batch), by power
    iteration on Hessian-vector products. Power iteration finds the eigenvalue largest in size;
    when that one is negative, a second run on H - lambda I finds the largest. Classical
    stability bound for a gradient step: lr < 2 / lambda_max."""
    torch.manual_seed(0)
    model = train_tiny.prepare(method, base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # attention built of plain ops, which autograd differentiates twice
        loss = train_tiny.answer_loss(model, train_tiny.problem_batch(problems, runtime.device),
                                      dataclasses.replace(runtime, amp=False))
    grads = torch.autograd.grad(loss, params, create_graph=True)

    def power_iteration(shift):  # the eigenvalue of H - shift I largest in size, plus shift
        gen = torch.Generator().manual_seed(0)
        v = [torch.randn(p.shape, generator=gen).to(p) for p in params]
        lam = 0.0
        for _ in range(iters):
            norm = torch.sqrt(sum((u * u).sum() for u in v))
            v = [u / norm for u in v]
            Hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            Hv = [h.detach() - shift * u for h, u in zip(Hv, v)]
            lam = sum((u * h).sum() for u, h in zip(v, Hv)).item()  # Rayleigh quotient of H - shift I
            v = Hv
        return lam + shift

    largest_in_size = power_iteration(0.0)
    return largest_in_size if largest_in_size >= 0 else power_iteration(largest_in_size)


# ----------------------------------------------------------------------------- tables and plots


def sweep_table(grid, lambdas):
    """Every method at every learning rate on the seeds that choose it ({method: {lr: runs}}):
    n, validation and test accuracy, eval loss and forgetting, mean +- std [95% interval]; the
    chosen lr in bold, beside lambda_max of the task loss's Hessian at the start."""
    lines = ["| method | lr | n | val accuracy | test accuracy [95% CI] | eval loss | Δ held-out loss | Δ arithmetic |",
             "|---" * 8 + "|"]
    cell = train_tiny.cell
    for method, by_lr in grid.items():
        chosen = best_lr(by_lr)
        for lr in sorted(by_lr):
            runs, mark = by_lr[lr], "**" if lr == chosen else ""
            lines.append(f"| {method} | {mark}{lr:.3g}{mark} | {len(runs)} | {cell(runs, 'val_accuracy', '{:.1%}')} | "
                         f"{ci_cell(runs, 'accuracy', '{:.1%}')} | {cell(runs, 'eval_loss', '{:.3f}')} | "
                         f"{cell(runs, 'forget_loss', '{:+.3f}')} | {cell(runs, 'forget_arithmetic', '{:+.1%}')} |")
    lines += ["", "| method | chosen lr | lambda_max | 2 / lambda_max |", "|---|---|---|---|"]
    lines += [f"| {m} | {best_lr(by_lr):.3g} | {lambdas.get(m, math.nan):.3g} | {2 / lambdas.get(m, math.nan):.3g} |"
              for m, by_lr in grid.items()]
    return "\n".join(lines)


def comparison_tables(final, reference="sorsa"):
    """The final comparison ({base: {method: {seed: result}}}, each method at its chosen lr on new
    seeds): per base and pooled over bases, each method's test accuracy and forgetting [95% CI],
    then reference minus each other method paired by (base, seed): the mean difference, its
    interval, and what the interval establishes."""
    groups = {**{f"base {b}": {b: by_method} for b, by_method in final.items()}, "pooled": final}
    keys = [("test accuracy", "accuracy", "{:+.1%}"), ("Δ held-out loss", "forget_loss", "{:+.3f}"),
            ("Δ arithmetic", "forget_arithmetic", "{:+.1%}")]
    lines = ["| bases | method | n | " + " | ".join(f"{name} [95% CI]" for name, _, _ in keys) + " |", "|---" * 6 + "|"]
    pairs = [f"| bases | {reference} minus | n pairs | " + " | ".join(f"{name}: mean difference [95% CI], verdict"
                                                           for name, _, _ in keys) + " |", "|---" * 6 + "|"]
    for label, bases in groups.items():
        methods = next(iter(bases.values()))
        for method in methods:
            runs = [r for by_method in bases.values() for r in by_method[method].values()]
            lines.append(f"| {label} | {method} | {len(runs)} | "
                         + " | ".join(ci_cell(runs, key, fmt.replace("+", "")) for _, key, fmt in keys) + " |")
            if method == reference or reference not in methods:
                continue
            matched = [(by_method[reference][s], by_method[method][s]) for by_method in bases.values()
                       for s in by_method[method] if s in by_method[reference]]
            cells = []
            for _, key, fmt in keys:
                mean, _, (low, high) = interval([a[key] - b[key] for a, b in matched])
                word = verdict(low, high)
                cells.append(f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}], "
                             + (word if word == "not established" else f"{reference} {word}"))
            pairs.append(f"| {label} | {method} | {len(matched)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + pairs)


def plot_sweep(grid, out):
    """sweep.png: test accuracy against learning rate, one line per method, error bars over seeds.
    forgetting.png: test accuracy against forgetting (the rise of the held-out pretraining loss),
    one point per method and learning rate, the trade-off PEFT's method comparison draws."""
    fig, fig2 = Figure(figsize=(7, 4.5)), Figure(figsize=(7, 4.5))
    ax, bx = fig.subplots(), fig2.subplots()
    for method, by_lr in grid.items():
        lrs = sorted(by_lr)
        acc = [interval([r["accuracy"] for r in by_lr[lr]])[:2] for lr in lrs]
        forget = [statistics.mean(r["forget_loss"] for r in by_lr[lr]) for lr in lrs]
        line = ax.errorbar(lrs, [m for m, _ in acc], yerr=[s for _, s in acc], label=method, capsize=3, marker="o")
        bx.plot(forget, [m for m, _ in acc], marker="o", label=method, color=line[0].get_color())
        for lr, x, (y, _) in zip(lrs, forget, acc):
            bx.annotate(f"{lr:.2g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    all_lrs = sorted({lr for by_lr in grid.values() for lr in by_lr})
    ax.set_xscale("log")
    ax.set_xticks(all_lrs, [f"{lr:.2g}" for lr in all_lrs], fontsize=7)
    ax.minorticks_off()
    ax.set(xlabel="learning rate", ylabel="test accuracy")
    bx.set(xlabel="forgetting: rise of the loss on held-out pretraining text", ylabel="test accuracy",
           title="one point per method and learning rate (labels)")
    for figure, axes, name in ((fig, ax, "sweep.png"), (fig2, bx, "forgetting.png")):
        axes.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(os.path.join(out, name), dpi=100)
        print(f"plot: {os.path.join(out, name)}")


# ----------------------------------------------------------------------------- the comparison, resumable


def run_key(cfg):
    """What makes two runs of one method, lr and seed the same experiment (for resuming). Where files go,
    which device runs it and which runs are planned do not (each logged run names its base)."""
    ignored = ("methods", "lrs", "seeds", "refine", "final_seeds", "base_seeds", "base_seed", "out", "device", "cache",
               "curve")
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def validation_problems(cfg, test):
    """cfg.val_size word problems apart from the test set: each method's learning rate is chosen on them."""
    seen, val, i = {p for p, _ in test}, [], 0
    while len(val) < cfg.val_size:
        problem = train_tiny.word_problem(random.Random(f"val {i}"))
        i += 1
        if problem[0] not in seen:
            seen.add(problem[0])
            val.append(problem)
    return val


def prepare_base(cfg, base_seed, runtime):
    """train_tiny.prepare_base with the validation problems, which training never draws either:
    (base model, its EvalData, the validation problems, its (eval loss, accuracy) on the task)."""
    base, _, data, scores = train_tiny.prepare_base(cfg, base_seed, runtime)
    val = validation_problems(cfg, data.test)
    return base, dataclasses.replace(data, exclude=data.exclude | {p for p, _ in val}), val, scores


def finished_runs(path, key):
    """{(method, lr, seed, base seed): result} of the runs a sweep log holds for this configuration."""
    if not os.path.exists(path):
        return {}
    done = {}
    for line in open(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by an interruption
            continue
        if row.get("key") == key:
            done[(row["method"], row["lr"], row["seed"], row["base_seed"])] = row["result"]
    return done


def run(cfg):
    """The three stages (see the module's docstring); returns the grid of stages 1-2 ({method: {lr: runs}}),
    the final comparison ({base: {method: {seed: result}}}, empty without final_seeds) and lambda_max."""
    runtime = train_tiny.start_runtime(cfg)
    methods, bases, seeds = cfg.methods.split(","), cfg.base_seed_list(), range(cfg.seeds)
    runtime.say(f"device {runtime.device}, methods {cfg.methods.replace(',', ', ')}, rank {cfg.rank}, {cfg.steps} "
                f"steps, seeds {cfg.seeds}, learning rates {cfg.lrs}, base models {cfg.base_seeds}")
    planned = len(methods) * (cfg.seeds * (len(cfg.sweep_lrs()) + 2 * cfg.refine) + len(bases) * cfg.final_seeds)
    os.makedirs(cfg.out, exist_ok=True)
    log_path, sweep_path, key = os.path.join(cfg.out, "log.jsonl"), os.path.join(cfg.out, "sweep.jsonl"), run_key(cfg)
    done, prepared = finished_runs(sweep_path, key), {}

    def runs(method, lr, seeds, base_seed):
        """Fine-tune (or find in the sweep log) method at lr on these seeds of one base model."""
        if base_seed not in prepared:
            prepared[base_seed] = prepare_base(cfg, base_seed, runtime)
        base, data, val, _ = prepared[base_seed]
        out = []
        for seed in seeds:
            if (method, lr, seed, base_seed) not in done:
                runtime.say(f"{method} at lr {lr:g}, seed {seed}, base model {base_seed} "
                            f"({len(done)} of {planned} planned runs done)")
                result, model = train_tiny.finetune(method, lr, base, data, cfg, seed, runtime, log_path)
                result["val_loss"], result["val_accuracy"] = train_tiny.evaluate(model, val, runtime)
                done[(method, lr, seed, base_seed)] = result
                train_tiny.append_jsonl(sweep_path, {"key": key, "method": method, "lr": lr, "seed": seed,
                                                     "base_seed": base_seed, "result": result}, runtime)
            out.append(done[(method, lr, seed, base_seed)])
        return out

    first, grid = bases[0], {m: {} for m in methods}
    for lr in cfg.sweep_lrs():
        for method in methods:
            grid[method][lr] = runs(method, lr, seeds, first)
    if cfg.refine:  # the neighbours of each method's best rate, on a sqrt 2 grid
        for method in methods:
            best = best_lr(grid[method])
            for lr in (best / math.sqrt(2), best * math.sqrt(2)):
                if lr not in grid[method]:
                    grid[method][lr] = runs(method, lr, seeds, first)
    chosen = {m: best_lr(grid[m]) for m in methods}
    final_seeds = range(cfg.seeds, cfg.seeds + cfg.final_seeds)
    final = {b: {m: dict(zip(final_seeds, runs(m, chosen[m], final_seeds, b))) for m in methods}
             for b in bases} if cfg.final_seeds else {}
    batch = next(train_tiny.training_batches(0, cfg, prepared[first][1].exclude))
    lambdas = {m: hessian_lambda_max(m, prepared[first][0], batch, cfg, runtime) for m in methods}
    return {"base": prepared[first][3], "runtime": runtime, "log": sweep_path, "results": grid, "final": final,
            "lambdas": lambdas}


def argument_parser():
    """A flag for each flat setting of Comparison (train_tiny's and the comparison's), and --quick."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {"lrs": "every method at each learning rate (SORSA at the listed lr, not 1.5x; gamma = gamma_ratio * lr, "
                    "so the regularizer's weight stays put)",
             "final_seeds": "each method at its chosen lr on this many new seeds of every base model, compared "
                            "pairwise with SORSA", "base_seeds": "pretraining seeds of the base models, e.g. 0,1,2"}
    for field in dataclasses.fields(Comparison):
        if field.type in (str, int, float) and field.name != "base_seed":  # base_seeds replaces it
            parser.add_argument(f"--{field.name}", type=type(field.default), required=field.name == "lrs",
                                choices=train_tiny.CHOICES.get(field.name),
                                help=f"{helps.get(field.name, '')} default {field.default!r}".strip())
    parser.add_argument("--refine", action="store_true", default=None,
                        help="add each method's best lr / sqrt 2 and * sqrt 2, then choose again")
    parser.add_argument("--quick", action="store_true", help="train_tiny's smoke-run settings under those given")
    return parser


def parse_args(argv=None):
    """A Comparison from the command line; bad values exit with status 2 and a message."""
    parser = argument_parser()
    cfg = train_tiny.parse_args(argv, parser, Comparison)  # the demo's checks apply too
    try:
        if not all(lr > 0 for lr in cfg.sweep_lrs()):
            raise ValueError
    except ValueError:
        parser.error(f"--lrs {cfg.lrs!r} must be positive numbers separated by commas, e.g. 1e-3,2e-3")
    try:
        if min(cfg.base_seed_list()) < 0:
            raise ValueError
    except ValueError:
        parser.error(f"--base_seeds {cfg.base_seeds!r} must be integers >= 0 separated by commas, e.g. 0,1,2")
    if cfg.final_seeds < 0 or cfg.val_size < 1:
        parser.error("--final_seeds must be >= 0 and --val_size >= 1")
    return cfg


def show(result, cfg):
    """The sweep's table with lambda_max, the paired comparison and the plots."""
    print(sweep_table(result["results"], result["lambdas"]))
    if result["final"]:
        print(f"\nAt the chosen learning rates, seeds {cfg.seeds}-{cfg.seeds + cfg.final_seeds - 1}:\n"
              + comparison_tables(result["final"]))
    plot_sweep(result["results"], cfg.out)


def main(argv=None):
    start, cfg = time.time(), parse_args(argv)
    result = run(cfg)
    if result["runtime"].main:
        print(f"\nbase model 0: eval loss {result['base'][0]:.3f}, accuracy {result['base'][1]:.1%}")
        show(result, cfg)
        print(f"log: {result['log']}\ntotal time {time.time() - start:.0f} s")
    if dist.is_initialized():
        si.end_distributed()


if __name__ == "__main__":
    sys.exit(main())
