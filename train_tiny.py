"""Pretrain a tiny GPT on arithmetic, then fine-tune it on word problems with SORSA, PiSSA,
LoRA and full fine-tuning, side by side: the paper's experiment (section 6) in miniature.

The base model learns sums, differences and products ("12+7=19") and plain sentences
("ann has 12 pens.") from a corpus this script generates. The downstream task, which it
never saw, is word problems answered with that arithmetic ("ann has 12 pens and gets 7
more. how many? 19"), scored like GSM-8K: exact match of the greedy answer on a held-out
set. Loss is on the answer only; the recipe is the paper's (AdamW, no weight decay,
cosine schedule with 3% warm-up, gradient clipping 1.0; bf16 autocast on CUDA).

    python train_tiny.py                  # CPU; the base model is cached for the next run
    python train_tiny.py --device cuda    # GPU
    python train_tiny.py --quick          # smoke run
"""

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import sorsa

# ----------------------------------------------------------------------------- data

VOCAB = ["<pad>"] + sorted(set("abcdefghijklmnopqrstuvwxyz0123456789 +-*=.?\n"))
STOI = {ch: i for i, ch in enumerate(VOCAB)}
PAD = 0
NAMES = ["ann", "bob", "cat", "dan", "eve", "fay", "gus", "hal", "ivy", "jon"]
ITEMS = ["pens", "cups", "apples", "books", "coins", "cards", "shells", "stamps"]


def encode(text):
    return [STOI[ch] for ch in text]


def decode(ids):
    return "".join(VOCAB[i] for i in ids if i != PAD)


def operands(rng, op):
    """Numbers the base model learns to combine: sums and differences to 10, products to 9 x 9."""
    if op == "*":
        return rng.randint(2, 9), rng.randint(2, 9)
    a = rng.randint(0, 10)
    return (a, rng.randint(0, a)) if op == "-" else (a, rng.randint(0, 10))


def apply_op(a, op, b):
    return {"+": a + b, "-": a - b, "*": a * b}[op]


def pretrain_line(rng):
    """One line of the base corpus: an arithmetic fact (4 lines in 5), or a plain sentence."""
    op = rng.choice("+-*")
    a, b = operands(rng, op)
    if rng.random() < 0.8:
        return f"{a}{op}{b}={apply_op(a, op, b)}"
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice([f"{name} has {a} {item}.", f"{name} gets {b} {item}.",
                       f"{name} gives away {b} {item}.", f"{name} has {a} bags of {b} {item}."])


def word_problem(rng):
    """(prompt, answer): a question the base model never saw; the answer writes the arithmetic
    out as the base model learned it ("7+5=12"), like a worked solution in MetaMathQA."""
    op = rng.choice("+-*")
    a, b = operands(rng, op)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    text = {"+": f"{name} has {a} {item} and gets {b} more.",
            "-": f"{name} has {a} {item} and gives away {b}.",
            "*": f"{name} has {a} bags of {b} {item}."}[op]
    return f"{text} how many?", f"{a}{op}{b}={apply_op(a, op, b)}"


def problem_batch(problems, device):
    """Inputs, targets (B, T) and a mask that keeps the loss on the answer and its newline only."""
    T = max(len(p) + len(a) + 1 for p, a in problems)  # the longest "prompt answer\n", less one
    x = torch.full((len(problems), T), PAD, dtype=torch.long)
    y = torch.full_like(x, PAD)
    mask = torch.zeros_like(x, dtype=torch.bool)
    for i, (prompt, answer) in enumerate(problems):
        ids = encode(f"{prompt} {answer}\n")
        x[i, :len(ids) - 1], y[i, :len(ids) - 1] = torch.tensor(ids[:-1]), torch.tensor(ids[1:])
        mask[i, len(prompt):len(ids) - 1] = True  # predicting " answer\n" after the prompt
    return x.to(device), y.to(device), mask.to(device)


# ----------------------------------------------------------------------------- the tiny GPT


@dataclass
class GPTConfig:
    block_size: int = 64  # longest sequence, in characters
    n_layer: int = 3
    n_head: int = 4
    d_model: int = 96
    vocab_size: int = len(VOCAB)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.d_model
        self.n_head = cfg.n_head
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):  # (B, T, d)
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.n_head, d // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, d))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.up_proj, self.down_proj = nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.Linear(4 * cfg.d_model, cfg.d_model)

    def forward(self, x):  # pre-norm residual block
        x = x + self.attn(self.ln_1(x))
        return x + self.down_proj(F.gelu(self.up_proj(self.ln_2(x))))


class TinyGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.wte, self.wpe = nn.Embedding(cfg.vocab_size, cfg.d_model), nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying

    def forward(self, idx):  # (B, T) -> logits (B, T, vocab)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]  # every linear of a block


# ----------------------------------------------------------------------------- configuration


@dataclass
class Config:
    device: str = "auto"  # auto: cuda when available
    methods: str = "sorsa,sorsa_g0,pissa,lora,full,sorsa_sq"  # sorsa_sq: squared regularizer (extra)
    targets: str = ",".join(BLOCK_LINEARS)  # adapted layers, in every block
    rank: int = 8
    steps: int = 300  # fine-tuning steps per method
    lr: float = 2e-3  # LoRA, PiSSA and full fine-tuning; SORSA gets 1.5x, as in the paper (3e-5 vs 2e-5)
    # SORSA's gamma, tuned: gamma / (SORSA's lr) = 0.1. The paper's ratio, 4e-4 / 3e-5 = 13.3
    # (gamma 0.04 here), drowns this small task's gradients: see README and theory/README.md.
    gamma: float = 0.1 * 1.5 * 2e-3
    batch_size: int = 32
    seeds: int = 1  # repeat every method with seeds 0 .. seeds-1; mean +- std
    test_size: int = 200  # held-out word problems
    pretrain_steps: int = 2500
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    out: str = "runs/tiny"  # log, plot, adapter
    cache: str = "runs/cache"  # pretrained base models, keyed by their configuration
    quick: bool = False  # smoke run: fewer steps everywhere
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)

    def sorsa_lr(self):
        return 1.5 * self.lr

    def shrink_for_quick(self):
        """The --quick settings: a smaller model, a short pretraining and fine-tuning, fewer test problems."""
        self.model = GPTConfig(n_layer=2, d_model=64)
        self.pretrain_steps, self.steps, self.test_size = 300, 40, 100


METHODS = ("sorsa", "sorsa_g0", "pissa", "lora", "full", "sorsa_sq")


# ----------------------------------------------------------------------------- base model, cached


def autocast(device):
    """bf16 autocast on CUDA, as the paper's mixed precision; plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def pretrain(cfg, device, progress):
    """Train TinyGPT on the generated corpus; returns the model and its final loss."""
    torch.manual_seed(0)
    model = TinyGPT(cfg.model).to(device)
    rng = random.Random(0)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    schedule = sorsa.cosine_schedule(opt, cfg.pretrain_steps)
    T = cfg.model.block_size
    for step in range(cfg.pretrain_steps):
        text = [encode("\n".join(pretrain_line(rng) for _ in range(12))) for _ in range(cfg.pretrain_batch)]
        starts = [rng.randrange(len(t) - T) for t in text]
        chunk = torch.tensor([t[s:s + T + 1] for t, s in zip(text, starts)], device=device)  # (B, T + 1)
        with autocast(device):
            logits = model(chunk[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        progress("pretrain", step + 1, cfg.pretrain_steps, loss.item())
    return model, loss.item()


def base_model(cfg, device, progress):
    """The pretrained base model from the cache, or pretrained now and cached atomically."""
    key = {"model": dataclasses.asdict(cfg.model), "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr,
           "batch": cfg.pretrain_batch, "vocab": VOCAB, "torch": torch.__version__.split("+")[0]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cfg.cache, f"tiny_gpt_{digest}.pt")
    if os.path.exists(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] != json.dumps(key, sort_keys=True):
                raise ValueError("configuration differs")
            model = TinyGPT(cfg.model)
            model.load_state_dict(saved["state"])
            print(f"base model: cached {path} (pretraining loss {saved['loss']:.3f})")
            return model.to(device), path
        except Exception as err:  # a corrupt or mismatched file is rebuilt, never trusted
            print(f"base model: cache {path} unusable ({type(err).__name__}: {err}); pretraining again")
    start = time.time()
    model, loss = pretrain(cfg, device, progress)
    os.makedirs(cfg.cache, exist_ok=True)
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=cfg.cache, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        torch.save({"key": json.dumps(key, sort_keys=True), "state": state, "loss": loss}, f)
    os.replace(tmp, path)
    print(f"base model: pretrained in {time.time() - start:.0f} s, loss {loss:.3f}, cached as {path}")
    return model, path


# ----------------------------------------------------------------------------- the other methods


class LowRankLinear(nn.Module):
    """y = x W^T + (x A^T) B^T + b with W frozen: LoRA (W = W_0, B = 0) and PiSSA (W = W_r)."""

    def __init__(self, W, A, B, bias):
        super().__init__()
        self.register_buffer("W", W.detach().clone())  # (m, n)
        self.A, self.B = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())  # (r, n), (m, r)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def lora(cls, linear, rank):
        """LoRA: A Kaiming-uniform, B = 0, scaling 1, so the model starts unchanged."""
        A = torch.empty(rank, linear.in_features, device=linear.weight.device, dtype=linear.weight.dtype)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        return cls(linear.weight, A, torch.zeros(linear.out_features, rank, dtype=A.dtype, device=A.device), linear.bias)

    @classmethod
    def pissa(cls, linear, rank):
        """PiSSA: SORSA's split with sqrt(S_p) folded into both factors, no regularizer."""
        U_p, S_p, Vt_p, W_r = sorsa.svd_split(linear.weight, rank)
        root = S_p.sqrt()
        return cls(W_r, root[:, None] * Vt_p, U_p * root, linear.bias)

    def forward(self, x):
        return F.linear(x, self.W, self.bias) + F.linear(F.linear(x, self.A), self.B)

    def weight(self):
        return self.W + self.B @ self.A  # (m, n), for the analysis metrics


def target_names(model, targets):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]


def prepare(method, base, cfg):
    """A fresh copy of the base model set up for `method`, and that method's learning rate."""
    model = copy.deepcopy(base)
    targets = cfg.targets.split(",")
    if method.startswith("sorsa"):
        sorsa.apply_sorsa(model, cfg.rank, targets)
        return model, cfg.sorsa_lr()
    if method == "full":
        return model.requires_grad_(True), cfg.lr
    names = target_names(model, targets)
    build = LowRankLinear.lora if method == "lora" else LowRankLinear.pissa
    for name in names:
        model.set_submodule(name, build(model.get_submodule(name), cfg.rank))
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).A.requires_grad_(True)
        model.get_submodule(name).B.requires_grad_(True)
    return model, cfg.lr


def effective_weight(module):
    """The (m, n) weight a layer applies, whatever method built it."""
    if isinstance(module, sorsa.SORSALinear):
        return module.merge().weight
    if isinstance(module, LowRankLinear):
        return module.weight()
    return module.weight


def weight_change(model, base, names):
    """Mean delta_sigma and delta_d (Eqs. 7-10) of the adapted layers against the base model."""
    with torch.no_grad():
        pairs = [(base.get_submodule(n).weight, effective_weight(model.get_submodule(n))) for n in names]
        return (statistics.mean(sorsa.delta_sigma(a, b) for a, b in pairs),
                statistics.mean(sorsa.delta_d(a, b) for a, b in pairs))


# ----------------------------------------------------------------------------- training and evaluation


def answer_loss(model, batch, device):
    x, y, mask = batch
    with autocast(device):
        logits = model(x)
    return F.cross_entropy(logits.float()[mask], y[mask])


@torch.no_grad()
def greedy(model, prompts, new_tokens, device):
    """The greedy continuation of each prompt, up to its first newline."""
    by_length = {}
    for i, prompt in enumerate(prompts):  # batch prompts of one length: no padding inside a prompt
        by_length.setdefault(len(prompt), []).append(i)
    out = [None] * len(prompts)
    for length, rows in by_length.items():
        idx = torch.tensor([encode(prompts[i]) for i in rows], device=device)  # (B, length)
        for _ in range(new_tokens):
            with autocast(device):
                nxt = model(idx)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        for i, ids in zip(rows, idx.tolist()):
            out[i] = decode(ids[length:]).split("\n")[0]
    return out


@torch.no_grad()
def evaluate(model, test, device):
    """(eval loss on the answers, exact-match accuracy of greedy answers) on the test problems."""
    model.eval()
    loss = answer_loss(model, problem_batch(test, device), device).item()
    # 8 tokens: the longest answer, "10+10=20", and its newline. Exact match of the final
    # number, as GSM-8K scores the number after "####".
    answers = greedy(model, [p + " " for p, _ in test], 8, device)
    correct = sum(got.split("=")[-1] == a.split("=")[-1] for got, (_, a) in zip(answers, test))
    model.train()
    return loss, correct / len(test)


def arithmetic_accuracy(model, device, n=200):
    """Share of n random facts ("7+5=") that the model completes correctly: what pretraining taught."""
    rng = random.Random("facts")
    facts = [(a, op, b) for op in (rng.choice("+-*") for _ in range(n)) for a, b in [operands(rng, op)]]
    model.eval()
    got = greedy(model, [f"\n{a}{op}{b}=" for a, op, b in facts], 3, device)
    model.train()
    return sum(g == str(apply_op(a, op, b)) for g, (a, op, b) in zip(got, facts)) / n


def train_step(model, opt, params, batch, gamma, lr_max, device, squared=False):
    """One step of the paper's recipe: answer loss plus (gamma / lr_max) L_reg (Eq. 6; nothing
    for gamma = 0), backward, clipping to norm 1.0, optimizer step. Returns the answer loss."""
    loss = answer_loss(model, batch, device)
    opt.zero_grad()
    sorsa.sorsa_loss(loss, model, gamma, lr_max, squared).backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss


def finetune(method, base, test, cfg, seed, device, progress, log):
    """Fine-tune one method with one seed; a dict of the reported numbers, and the model."""
    model, lr = prepare(method, base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = sorsa.cosine_schedule(opt, cfg.steps)
    gamma = {"sorsa": cfg.gamma, "sorsa_sq": cfg.gamma}.get(method, 0.0)
    names = target_names(base, cfg.targets.split(","))
    rng = random.Random(1000 + seed)  # the same problems in the same order for every method
    test_prompts = {p for p, _ in test}
    losses, step_time = [], 0.0
    for step in range(cfg.steps):
        problems = []
        while len(problems) < cfg.batch_size:
            p = word_problem(rng)
            if p[0] not in test_prompts:
                problems.append(p)
        start = time.perf_counter()
        loss = train_step(model, opt, params, problem_batch(problems, device), gamma, lr, device,
                          squared=method == "sorsa_sq")
        schedule.step()
        step_time += time.perf_counter() - start
        losses.append(loss.item())
        progress(f"{method} seed {seed}", step + 1, cfg.steps, loss.item())
        if step == 0 or (step + 1) % max(1, cfg.steps // 5) == 0 or step + 1 == cfg.steps:
            eval_loss, acc = evaluate(model, test, device)
            d_sigma, d_d = weight_change(model, base, names)
            log({"method": method, "seed": seed, "step": step + 1, "train_loss": loss.item(), "eval_loss": eval_loss,
                 "accuracy": acc, "delta_sigma": d_sigma, "delta_d": d_d})
    tail = losses[-max(1, cfg.steps // 10):]  # the last evaluation above is the final one
    return {"params": sum(p.numel() for p in params), "train_loss": statistics.mean(tail), "eval_loss": eval_loss,
            "accuracy": acc, "delta_sigma": d_sigma, "delta_d": d_d, "ms_per_step": 1e3 * step_time / cfg.steps}, model


def check_merge_and_adapter(model, base, test, cfg, device, base_path):
    """Merged and reloaded SORSA models against the trained one: accuracy, logits, file sizes."""
    x = problem_batch(test, device)[0]
    with torch.no_grad():
        logits = model(x).float()
    merged = copy.deepcopy(model)
    sorsa.merge_sorsa(merged)
    path = os.path.join(cfg.out, "sorsa_adapter.pt")
    sorsa.save_adapter(model, path)
    reloaded = copy.deepcopy(base)
    sorsa.load_adapter(reloaded, path)
    rows = {}
    for label, m in (("merged", merged), ("reloaded", reloaded)):
        with torch.no_grad():
            diff = (m(x).float() - logits).abs().max().item()
        rows[label] = (evaluate(m, test, device)[1], diff)
    return rows, os.path.getsize(path), os.path.getsize(base_path)


# ----------------------------------------------------------------------------- reporting


def mean_std(values):
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)


def results_table(results):
    """Markdown table: one row per method, mean +- std over seeds."""
    cols = [("train loss", "train_loss", "{:.3f}"), ("eval loss", "eval_loss", "{:.3f}"),
            ("accuracy", "accuracy", "{:.1%}"), ("delta_sigma", "delta_sigma", "{:.4f}"),
            ("delta_d", "delta_d", "{:.4f}"), ("ms/step", "ms_per_step", "{:.1f}")]
    lines = ["| method | trainable params | " + " | ".join(c[0] for c in cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for method, runs in results.items():
        cells = []
        for _, key, fmt in cols:
            m, s = mean_std([r[key] for r in runs])
            cells.append(fmt.format(m) + (f" ± {fmt.format(s)}" if len(runs) > 1 else ""))
        lines.append(f"| {method} | {runs[0]['params']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(log_path, out):
    """Loss and delta curves per method as a PNG, when matplotlib is installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipped the plot (pip install matplotlib)")
        return
    rows = [json.loads(line) for line in open(log_path)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, key in zip(axes, ("eval_loss", "delta_sigma", "delta_d")):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(r["step"], r[key]) for r in rows if r["method"] == method and r["seed"] == 0]
            ax.plot(*zip(*points), label=method)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.set_yscale("log" if key == "eval_loss" else "linear")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    print(f"plot: {os.path.join(out, 'curves.png')}")


class Progress:
    """Prints step, loss and an ETA over the whole run, about every 5% of each phase."""

    def __init__(self, total_steps):
        self.total, self.done, self.start = total_steps, 0, time.time()

    def __call__(self, phase, step, steps, loss):
        self.done += 1
        if step == steps or step % max(1, steps // 20) == 0:
            eta = (time.time() - self.start) / self.done * max(0, self.total - self.done)
            print(f"  {phase:>16}  step {step:4d}/{steps}  loss {loss:.3f}  eta {eta:4.0f} s", flush=True)


# ----------------------------------------------------------------------------- entry points


def run(cfg):
    """The whole experiment; returns {method: [result per seed]} and the SORSA checks."""
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          "cpu" if cfg.device == "auto" else cfg.device)
    methods = cfg.methods.split(",")
    print(f"device {device}, methods {', '.join(methods)}, rank {cfg.rank}, {cfg.steps} steps, seeds {cfg.seeds}")
    progress = Progress(cfg.pretrain_steps + len(methods) * cfg.seeds * cfg.steps)
    base, base_path = base_model(cfg, device, progress)
    progress.total -= cfg.pretrain_steps - progress.done  # a cached base model needs no pretraining
    base.requires_grad_(False)
    test = [word_problem(random.Random(f"test {i}")) for i in range(cfg.test_size)]
    base_loss, base_acc = evaluate(base, test, device)
    print(f"base model: {arithmetic_accuracy(base, device):.1%} of 200 arithmetic facts right; "
          f"on the task: eval loss {base_loss:.3f}, accuracy {base_acc:.1%}")
    os.makedirs(cfg.out, exist_ok=True)
    log_path = os.path.join(cfg.out, "log.jsonl")
    results, checks = {}, None
    with open(log_path, "w") as log_file:
        def log(row):
            log_file.write(json.dumps(row) + "\n")

        for method in methods:
            for seed in range(cfg.seeds):
                torch.manual_seed(seed)  # LoRA's initialization
                result, model = finetune(method, base, test, cfg, seed, device, progress, log)
                results.setdefault(method, []).append(result)
                if method == "sorsa" and seed == 0:
                    checks = check_merge_and_adapter(model, base, test, cfg, device, base_path)
    return {"base": (base_loss, base_acc), "results": results, "checks": checks, "log": log_path}


def parse_args(argv=None):
    """A Config from the command line; bad values exit with status 2 and a message."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=defaults.device)
    for field in ("methods", "targets", "rank", "steps", "lr", "gamma", "seeds", "out"):
        value = getattr(defaults, field)
        parser.add_argument(f"--{field}", type=type(value), default=value, help=f"default {value}")
    parser.add_argument("--quick", action="store_true", help="smoke run: short pretraining and fine-tuning")
    args = parser.parse_args(argv)
    cfg = dataclasses.replace(defaults, **{k: v for k, v in vars(args).items()})
    if cfg.quick:
        cfg.shrink_for_quick()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this PyTorch sees no CUDA GPU; use --device cpu (or auto)")
    unknown = set(cfg.methods.split(",")) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {', '.join(sorted(unknown))}; choose from {', '.join(METHODS)}")
    bad_targets = set(cfg.targets.split(",")) - set(BLOCK_LINEARS)
    if bad_targets:
        parser.error(f"unknown target(s) {', '.join(sorted(bad_targets))}; choose from {', '.join(BLOCK_LINEARS)}")
    if not 1 <= cfg.rank <= cfg.model.d_model:
        parser.error(f"--rank {cfg.rank} is outside [1, {cfg.model.d_model}]: the smallest adapted layer "
                     f"is {cfg.model.d_model}x{cfg.model.d_model}")
    if cfg.steps < 1 or cfg.seeds < 1 or not cfg.lr > 0 or not cfg.gamma >= 0:
        parser.error("--steps and --seeds must be >= 1, --lr > 0 and --gamma >= 0")
    for folder in (cfg.out, cfg.cache):
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            parser.error(f"cannot write to {folder}: {err.strerror}; pass a writable --out")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    start = time.time()
    report = run(cfg)
    print(f"\nbase model: eval loss {report['base'][0]:.3f}, accuracy {report['base'][1]:.1%}")
    print(results_table(report["results"]))
    if report["checks"]:
        rows, adapter_bytes, base_bytes = report["checks"]
        for label, (acc, diff) in rows.items():
            print(f"SORSA {label}: accuracy {acc:.1%}, max |logit difference| {diff:.2e}")
        print(f"adapter file {adapter_bytes / 1e3:.0f} kB; base model file {base_bytes / 1e3:.0f} kB")
    print(f"log: {report['log']}")
    plot(report["log"], cfg.out)
    print(f"total time {time.time() - start:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
