"""Pretrain a tiny GPT on arithmetic, then fine-tune it on word problems with SORSA, PiSSA,
LoRA and full fine-tuning, side by side: the paper's experiment (section 6) in miniature.

The base model learns sums, differences and products ("12+7=19") and plain sentences
("ann has 12 pens.") from a corpus this script generates. The downstream task, which it
never saw, is word problems answered with that arithmetic ("ann has 12 pens and gets 7
more. how many? 12+7=19"), scored like GSM-8K: exact match of the greedy answer on a
held-out test set. Loss is on the answer only; the recipe is the paper's (AdamW, no weight
decay, cosine schedule with 3% warm-up, gradient clipping 1.0; bf16 autocast on CUDA).

    python train_tiny.py                  # CPU; the base model is cached for the next run
    python train_tiny.py --device cuda    # GPU
    python train_tiny.py --quick          # smoke run
    python train_tiny.py --lrs 1e-3,2e-3,4e-3,8e-3 --seeds 3    # each method at each learning rate
    python train_tiny.py --lrs ... --refine --final_seeds 10 --base_seeds 0,1,2   # docs/comparison.md
    torchrun --standalone --nproc_per_node 2 train_tiny.py      # DDP (add --fsdp for FSDP2)

Every run also measures forgetting: the rise of the loss on held-out pretraining text and the
change of arithmetic accuracy, against the base model.
"""

import argparse
import contextlib
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
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.nn.attention import SDPBackend, sdpa_kernel

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


def held_out(cfg):
    """(test problems, validation problems): disjoint, and never drawn for training. The sweep
    picks each method's learning rate on the validation set and reports the test set."""
    test = [word_problem(random.Random(f"test {i}")) for i in range(cfg.test_size)]
    seen, val, i = {p for p, _ in test}, [], 0
    while len(val) < cfg.val_size:
        problem = word_problem(random.Random(f"val {i}"))
        i += 1
        if problem[0] not in seen:
            seen.add(problem[0])
            val.append(problem)
    return test, val


@dataclass
class Evaluation:
    """What every fine-tuning run on one base model is measured on."""
    test: list  # (prompt, answer) word problems, reported
    val: list  # other word problems, on which a sweep picks each method's learning rate
    heldout: torch.Tensor  # (B, T + 1) pretraining text never trained on: forgetting
    base_skills: tuple  # the base model's (held-out loss, arithmetic accuracy)


def training_batches(seed, cfg, exclude):
    """The fine-tuning stream of one seed: the same problems in the same order for every method
    and learning rate; each a list of cfg.batch_size problems (the global batch)."""
    rng = random.Random(1000 + seed)
    for _ in range(cfg.steps):
        batch = []
        while len(batch) < cfg.batch_size:
            problem = word_problem(rng)
            if problem[0] not in exclude:
                batch.append(problem)
        yield batch


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


def answer_tokens(problems):
    """How many answer tokens a batch of problems scores: len(" answer\n")."""
    return sum(len(a) + 1 for _, a in problems)


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
    # gamma / (SORSA's lr) on sorsa.py's default scale, the authors': L_reg is the mean over the 36
    # factor matrices. Chosen on validation from the paper's effective 0.208 (which did as well: not
    # established either way), 0.4, 1.2, 3.6 and its nominal 13.3, which drowns this task's gradients
    # (python -m theory.gamma; docs/gamma.md).
    gamma_ratio: float = 0.4
    lrs: str = ""  # a sweep: e.g. "1e-3,2e-3,4e-3"; every method (SORSA too) at each, gamma = gamma_ratio * lr
    refine: bool = False  # a sweep: then also each method's best lr / sqrt 2 and * sqrt 2
    final_seeds: int = 0  # a sweep: then each method at its chosen lr on this many new seeds, on every base
    batch_size: int = 32  # the global batch; under torchrun each rank takes its share
    seeds: int = 1  # repeat every method with seeds 0 .. seeds-1 (in a sweep: to choose the lr); mean +- std
    base_seeds: str = "0"  # pretraining seeds of the base models; the first is the demo's and chooses a sweep's lr
    test_size: int = 200  # held-out word problems, reported
    val_size: int = 200  # other held-out problems, on which a sweep picks each method's learning rate
    pretrain_steps: int = 2500
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    autocast: str = "auto"  # bf16 autocast: auto (on CUDA only), on, off
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard) instead of DDP
    out: str = "runs/tiny"  # log, plot, adapter
    cache: str = "runs/cache"  # pretrained base models, keyed by their configuration
    quick: bool = False  # smoke run: fewer steps everywhere
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)

    def method_lr(self, method, lr=None):
        """A method's learning rate: in a sweep the listed lr for every method; else self.lr,
        times 1.5 for SORSA as in the paper."""
        if lr is not None:
            return lr
        return 1.5 * self.lr if method.startswith("sorsa") else self.lr

    def gamma(self, method, lr):
        """SORSA's gamma at its learning rate lr: gamma / lr stays gamma_ratio (Eq. 6's weight)."""
        return self.gamma_ratio * lr if method in ("sorsa", "sorsa_sq") else 0.0

    def sweep_lrs(self):
        return [float(v) for v in self.lrs.split(",")] if self.lrs else []

    def base_seed_list(self):
        return [int(v) for v in self.base_seeds.split(",")]

    def shrink_for_quick(self):
        """The --quick settings: a smaller model, a short pretraining and fine-tuning, fewer test problems."""
        self.model = GPTConfig(n_layer=2, d_model=64)
        self.pretrain_steps, self.steps, self.test_size, self.val_size = 300, 40, 100, 100


METHODS = ("sorsa", "sorsa_g0", "pissa", "lora", "full", "sorsa_sq")


@dataclass
class Runtime:
    """Where a run computes: device, bf16 autocast, and its place among torchrun's processes."""
    device: torch.device
    amp: bool = False
    rank: int = 0
    world: int = 1
    fsdp: bool = False

    @property
    def main(self):
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.main:
            print(*args, **kwargs)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)


# ----------------------------------------------------------------------------- base model, cached


def pretrain_chunks(rng, cfg, n):
    """n windows of block_size + 1 characters of the base corpus (B, T + 1), each cut at random
    from a fresh 12-line document."""
    T = cfg.model.block_size
    text = [encode("\n".join(pretrain_line(rng) for _ in range(12))) for _ in range(n)]
    starts = [rng.randrange(len(t) - T) for t in text]
    return torch.tensor([t[s:s + T + 1] for t, s in zip(text, starts)])


def pretraining_batches(cfg, base_seed):
    """The batches (B, T + 1) pretraining draws for a base seed, one per step, in order."""
    rng = random.Random(base_seed)
    return (pretrain_chunks(rng, cfg, cfg.pretrain_batch) for _ in range(cfg.pretrain_steps))


def lm_loss(model, chunk, rt):
    """Next-character cross-entropy at every position of windows (B, T + 1): pretraining's loss."""
    with rt.autocast():
        logits = model(chunk[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())


def pretrain(cfg, base_seed, rt, progress):
    """Train TinyGPT on the generated corpus, its initialization and data drawn from base_seed;
    returns the model and its final loss."""
    torch.manual_seed(base_seed)
    model = TinyGPT(cfg.model).to(rt.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    schedule = sorsa.cosine_schedule(opt, cfg.pretrain_steps)
    for step, chunk in enumerate(pretraining_batches(cfg, base_seed)):
        loss = lm_loss(model, chunk.to(rt.device), rt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        progress("pretrain", step + 1, cfg.pretrain_steps, loss.item())
    return model, loss.item()


def base_model(cfg, base_seed, rt, progress):
    """The base model pretrained with base_seed, from the cache, or pretrained now and cached
    atomically with a checksum. Under torchrun rank 0 pretrains while the others wait."""
    key = json.dumps({"model": dataclasses.asdict(cfg.model), "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr,
                      "batch": cfg.pretrain_batch, "vocab": VOCAB, "amp": rt.amp, "base_seed": base_seed,
                      "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    path = os.path.join(cfg.cache, f"tiny_gpt_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if rt.main or rt.world == 1:
        model = cached_base(cfg, key, path, rt)
        if model is None:
            start = time.time()
            model, loss = pretrain(cfg, base_seed, rt, progress)
            os.makedirs(cfg.cache, exist_ok=True)
            sorsa.save_checked({k: v.cpu() for k, v in model.state_dict().items()}, path, key=key, loss=loss)
            rt.say(f"base model {base_seed}: pretrained in {time.time() - start:.0f} s, loss {loss:.3f}, cached as {path}")
    if rt.world > 1:
        dist.barrier()  # rank 0 has written the cache
        if not rt.main:
            model = cached_base(cfg, key, path, rt)
    return model.to(rt.device), path


def cached_base(cfg, key, path, rt):
    """The cached base model, or None when there is none or it is unusable (truncated,
    corrupted or made with another configuration: it is then rebuilt, never trusted)."""
    if not os.path.exists(path):
        return None
    try:
        state, extra = sorsa.load_checked(path)
        if extra.get("key") != key:
            raise ValueError("it was made with another configuration")
        model = TinyGPT(cfg.model)
        model.load_state_dict(state)
    except (ValueError, RuntimeError) as err:
        rt.say(f"base model: cache {path} unusable ({err}); pretraining again")
        return None
    rt.say(f"base model: cached {path} (pretraining loss {extra['loss']:.3f})")
    return model


# ----------------------------------------------------------------------------- the other methods


class LowRankLinear(nn.Module):
    """y = x W^T + (x A^T) B^T + b with W frozen: LoRA (W = W_0, B = 0) and PiSSA (W = W_r)."""

    def __init__(self, W, A, B, bias):
        super().__init__()
        self.W = nn.Parameter(W.detach().clone(), requires_grad=False)  # (m, n), frozen like SORSA's W_r
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
        W, A, B = (sorsa.full_tensor(t) for t in (self.W, self.A, self.B))
        return W + B @ A  # (m, n), for the analysis metrics


def target_names(model, targets):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]


def prepare(method, base, cfg):
    """A fresh copy of the base model set up for `method`."""
    model = copy.deepcopy(base)
    targets = cfg.targets.split(",")
    if method.startswith("sorsa"):
        sorsa.apply_sorsa(model, cfg.rank, targets)
        return model
    if method == "full":
        return model.requires_grad_(True)
    names = target_names(model, targets)
    build = LowRankLinear.lora if method == "lora" else LowRankLinear.pissa
    for name in names:
        model.set_submodule(name, build(model.get_submodule(name), cfg.rank))
    model.requires_grad_(False)
    for name in names:
        model.get_submodule(name).A.requires_grad_(True)
        model.get_submodule(name).B.requires_grad_(True)
    return model


def distribute(model, method, rt):
    """The model as it trains under torchrun: DDP, or FSDP2 by block (SORSA's Vt_p by columns,
    so its regularizer needs only r x r all-reduces); as it is in one process."""
    if rt.world == 1:
        return model
    if not rt.fsdp:
        return nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda"
                                                   else None)
    placement = sorsa.fsdp_shard_placement(model) if method.startswith("sorsa") else None
    for block in model.blocks:
        fully_shard(block, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    return model


def effective_weight(module):
    """The (m, n) weight a layer applies, whatever method built it (FSDP2 shards gathered)."""
    if isinstance(module, sorsa.SORSALinear):
        return module.merge().weight
    if isinstance(module, LowRankLinear):
        return module.weight()
    return sorsa.full_tensor(module.weight)


def weight_change(model, base, names):
    """Mean delta_sigma and delta_d (Eqs. 7-10) of the adapted layers against the base model."""
    inner = sorsa.unwrap(model)
    with torch.no_grad():
        pairs = [(base.get_submodule(n).weight, effective_weight(inner.get_submodule(n))) for n in names]
        if not all(torch.isfinite(b).all() for _, b in pairs):  # diverged (too large a learning rate)
            return math.nan, math.nan
        return (statistics.mean(sorsa.delta_sigma(a, b) for a, b in pairs),
                statistics.mean(sorsa.delta_d(a, b) for a, b in pairs))


# ----------------------------------------------------------------------------- training and evaluation


def answer_loss(model, batch, rt, tokens=None):
    """Cross-entropy on the answer tokens, summed and divided by `tokens` (default: this batch's)."""
    x, y, mask = batch
    with rt.autocast():
        logits = model(x)
    return F.cross_entropy(logits.float()[mask], y[mask], reduction="sum") / (tokens or mask.sum())


@torch.no_grad()
def greedy(model, prompts, new_tokens, rt):
    """The greedy continuation of each prompt, up to its first newline."""
    by_length = {}
    for i, prompt in enumerate(prompts):  # batch prompts of one length: no padding inside a prompt
        by_length.setdefault(len(prompt), []).append(i)
    out = [None] * len(prompts)
    for length, rows in by_length.items():
        idx = torch.tensor([encode(prompts[i]) for i in rows], device=rt.device)  # (B, length)
        for _ in range(new_tokens):
            with rt.autocast():
                nxt = model(idx)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        for i, ids in zip(rows, idx.tolist()):
            out[i] = decode(ids[length:]).split("\n")[0]
    return out


@contextlib.contextmanager
def evaluating(model):
    """Eval mode and no gradients inside; the model's own mode back after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(model, problems, rt):
    """(eval loss on the answers, exact-match accuracy of greedy answers) on held-out problems.
    Under torchrun every rank evaluates the same problems (FSDP2 needs every rank's shards)."""
    with evaluating(model):
        loss = answer_loss(model, problem_batch(problems, rt.device), rt).item()
        # 8 tokens: the longest answer, "10+10=20", and its newline. Exact match of the final
        # number, as GSM-8K scores the number after "####".
        answers = greedy(model, [p + " " for p, _ in problems], 8, rt)
    correct = sum(got.split("=")[-1] == a.split("=")[-1] for got, (_, a) in zip(answers, problems))
    return loss, correct / len(problems)


def arithmetic_accuracy(model, rt, n=200):
    """Share of n random facts ("7+5=") that the model completes correctly: what pretraining taught."""
    rng = random.Random("facts")
    facts = [(a, op, b) for op in (rng.choice("+-*") for _ in range(n)) for a, b in [operands(rng, op)]]
    with evaluating(model):
        got = greedy(model, [f"\n{a}{op}{b}=" for a, op, b in facts], 3, rt)
    return sum(g == str(apply_op(a, op, b)) for g, (a, op, b) in zip(got, facts)) / n


def heldout_text(cfg, n=256):
    """n windows of the base corpus from a stream of their own (B, T + 1): text of the pretraining
    distribution that pretraining never drew (test_train_tiny checks it for the default settings)."""
    return pretrain_chunks(random.Random("held-out pretraining text"), cfg, n)


def pretraining_skills(model, heldout, rt):
    """(loss on held-out pretraining text, arithmetic accuracy): what fine-tuning may make a model forget."""
    with evaluating(model):
        loss = lm_loss(model, heldout.to(rt.device), rt).item()
    return loss, arithmetic_accuracy(model, rt)


def forgetting(model, data, rt):
    """(rise of the held-out pretraining loss, change of arithmetic accuracy) against the base model,
    as PEFT's method comparison reports forgetting; an unchanged model gives exactly (0, 0)."""
    loss, arithmetic = pretraining_skills(model, data.heldout, rt)
    return loss - data.base_skills[0], arithmetic - data.base_skills[1]


def train_step(model, opt, params, problems, gamma, lr_max, rt, squared=False):
    """One step of the paper's recipe on a global batch of problems, in the authors' order: the
    answer loss's backward, its gradient clipped to norm 1.0, then (gamma / lr_max) grad L_reg
    added unclipped (Eq. 6; nothing for gamma = 0), the optimizer step. Under torchrun each rank
    takes every world-th problem and divides its summed loss by the global batch's token count
    times world, so that DDP's mean of the gradients is the single-process gradient. Returns the
    global batch's answer loss."""
    local = problems[rt.rank::rt.world]
    loss = answer_loss(model, problem_batch(local, rt.device), rt, answer_tokens(problems) / rt.world)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if gamma > 0:
        sorsa.add_regularizer_grad(model, gamma, lr_max, squared)
    opt.step()
    loss = loss.detach()
    if rt.world > 1:
        dist.all_reduce(loss)
        loss /= rt.world
    return loss


def finetune(method, lr, base, data, cfg, seed, rt, progress, log):
    """Fine-tune one method with one seed at learning rate lr on one base model (data: its
    Evaluation); the reported numbers, and the model."""
    test, val = data.test, data.val
    torch.manual_seed(seed)  # LoRA's initialization
    model = distribute(prepare(method, base, cfg), method, rt)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = sorsa.cosine_schedule(opt, cfg.steps)
    gamma = cfg.gamma(method, lr)
    names = target_names(base, cfg.targets.split(","))
    exclude = {p for p, _ in test + val}
    losses, step_time = [], 0.0
    for step, problems in enumerate(training_batches(seed, cfg, exclude)):
        start = time.perf_counter()
        loss = train_step(model, opt, params, problems, gamma, lr, rt, squared=method == "sorsa_sq")
        schedule.step()
        step_time += time.perf_counter() - start
        losses.append(loss.item())
        progress(f"{method} seed {seed}", step + 1, cfg.steps, loss.item())
        curve = not cfg.lrs and (step == 0 or (step + 1) % max(1, cfg.steps // 5) == 0)  # a sweep: the end only
        if curve or step + 1 == cfg.steps:
            eval_loss, acc = evaluate(model, test, rt)
            d_sigma, d_d = weight_change(model, base, names)
            log({"method": method, "lr": lr, "seed": seed, "step": step + 1, "train_loss": loss.item(),
                 "eval_loss": eval_loss, "accuracy": acc, "delta_sigma": d_sigma, "delta_d": d_d})
    val_loss, val_acc = evaluate(model, val, rt)
    forget_loss, forget_arithmetic = forgetting(model, data, rt)
    tail = losses[-max(1, cfg.steps // 10):]  # the last evaluation above is the final one
    return {"params": sum(p.numel() for p in params), "train_loss": statistics.mean(tail),
            "eval_loss": eval_loss, "accuracy": acc, "val_loss": val_loss, "val_accuracy": val_acc,
            "forget_loss": forget_loss, "forget_arithmetic": forget_arithmetic,
            "delta_sigma": d_sigma, "delta_d": d_d, "ms_per_step": 1e3 * step_time / cfg.steps}, model


def check_merge_and_adapter(model, base, test, cfg, rt, base_path):
    """The SORSA model saved as an adapter and reloaded into a fresh base, and merged in place into
    plain nn.Linear layers, against the trained one: accuracy, logits, file sizes."""
    model = sorsa.unwrap(model)  # DDP's wrapper is for training; FSDP2 shards in place
    x = problem_batch(test, rt.device)[0]
    with torch.no_grad():
        logits = model(x).float()
    path = os.path.join(cfg.out, "sorsa_adapter.pt")
    sorsa.save_adapter(model, path)  # rank 0 writes; every rank returns once the file is complete
    reloaded = copy.deepcopy(base)
    sorsa.load_adapter(reloaded, path)
    sorsa.merge_sorsa(model)  # the last use of the trained model
    rows = {}
    for label, m in (("merged", model), ("reloaded", reloaded)):
        with torch.no_grad():
            diff = (m(x).float() - logits).abs().max().item()
        rows[label] = (evaluate(m, test, rt)[1], diff)
    return rows, os.path.getsize(path), os.path.getsize(base_path)


def hessian_lambda_max(method, base, problems, cfg, rt, iters=60):
    """The largest eigenvalue of the task loss's Hessian with respect to a method's trainable
    parameters at the start of fine-tuning (float32, no autocast, one fixed batch), by power
    iteration on Hessian-vector products. Power iteration finds the eigenvalue largest in size;
    when that one is negative, a second run on H - lambda I finds the largest. Classical
    stability bound for a gradient step: lr < 2 / lambda_max."""
    torch.manual_seed(0)
    model = prepare(method, base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):  # attention built of plain ops, which autograd differentiates twice
        loss = answer_loss(model, problem_batch(problems, rt.device), dataclasses.replace(rt, amp=False))
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


# ----------------------------------------------------------------------------- reporting


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


COLUMNS = [("train loss", "train_loss", "{:.3f}"), ("eval loss", "eval_loss", "{:.3f}"),
           ("accuracy", "accuracy", "{:.1%}"), ("val accuracy", "val_accuracy", "{:.1%}"),
           ("Δ held-out loss", "forget_loss", "{:+.3f}"),
           ("Δ arithmetic", "forget_arithmetic", "{:+.1%}"), ("delta_sigma", "delta_sigma", "{:.4f}"),
           ("delta_d", "delta_d", "{:.4f}"), ("ms/step", "ms_per_step", "{:.1f}")]


def cell(runs, key, fmt, ci=False):
    """mean +- std over the runs, and with ci its 95% interval."""
    mean, std, (low, high) = interval([r[key] for r in runs])
    text = fmt.format(mean) + (f" ± {fmt.format(std).lstrip('+')}" if len(runs) > 1 else "")
    return text + (f" [{fmt.format(low)}, {fmt.format(high)}]" if ci and len(runs) > 1 else "")


def results_table(results):
    """Markdown table: one row per method, mean +- std over seeds."""
    lines = ["| method | trainable params | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for method, runs in results.items():
        lines.append(f"| {method} | {runs[0]['params']:,} | " + " | ".join(cell(runs, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)


def best_lr(by_lr):
    """The learning rate with the best mean validation accuracy (then the lower validation loss)."""
    def score(lr):
        loss = statistics.mean(r["val_loss"] for r in by_lr[lr])
        return statistics.mean(r["val_accuracy"] for r in by_lr[lr]), -loss if math.isfinite(loss) else -math.inf
    return max(by_lr, key=score)


def sweep_table(grid, lambdas):
    """Every method at every learning rate on the seeds that choose it ({method: {lr: runs}}):
    n, validation and test accuracy, eval loss and forgetting, mean +- std [95% interval]; the
    chosen lr in bold, beside lambda_max of the task loss's Hessian at the start."""
    lines = ["| method | lr | n | val accuracy | test accuracy [95% CI] | eval loss | Δ held-out loss | Δ arithmetic |",
             "|---" * 8 + "|"]
    for method, by_lr in grid.items():
        chosen = best_lr(by_lr)
        for lr in sorted(by_lr):
            runs, mark = by_lr[lr], "**" if lr == chosen else ""
            lines.append(f"| {method} | {mark}{lr:.3g}{mark} | {len(runs)} | {cell(runs, 'val_accuracy', '{:.1%}')} | "
                         f"{cell(runs, 'accuracy', '{:.1%}', ci=True)} | {cell(runs, 'eval_loss', '{:.3f}')} | "
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
                         + " | ".join(cell(runs, key, fmt.replace("+", ""), ci=True) for _, key, fmt in keys) + " |")
            if method == reference or reference not in methods:
                continue
            matched = [(by_method[reference][s], by_method[method][s]) for by_method in bases.values()
                       for s in by_method[method] if s in by_method[reference]]
            cells = []
            for _, key, fmt in keys:
                diffs = [a[key] - b[key] for a, b in matched]
                mean, _, (low, high) = interval(diffs)
                word = verdict(low, high)
                cells.append(f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}], "
                             + (word if word == "not established" else f"{reference} {word}"))
            pairs.append(f"| {label} | {method} | {len(matched)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + pairs)


def plot(log_path, out):
    """Loss and delta curves per method as a PNG, when matplotlib is installed."""
    plt = pyplot()
    if plt is None:
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


def plot_sweep(grid, out):
    """sweep.png: test accuracy against learning rate, one line per method, error bars over seeds.
    forgetting.png: test accuracy against forgetting (the rise of the held-out pretraining loss),
    one point per method and learning rate, the trade-off PEFT's method comparison draws."""
    plt = pyplot()
    if plt is None:
        return
    (fig, ax), (fig2, bx) = plt.subplots(figsize=(7, 4.5)), plt.subplots(figsize=(7, 4.5))
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


def pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: skipped the plot (pip install matplotlib)")
        return None


class Progress:
    """Prints step, loss and an ETA over the whole run, about every 5% of each phase (rank 0)."""

    def __init__(self, total_steps, rt):
        self.total, self.done, self.start, self.rt = total_steps, 0, time.time(), rt

    def __call__(self, phase, step, steps, loss):
        self.done += 1
        if step == steps or step % max(1, steps // 20) == 0:
            eta = (time.time() - self.start) / self.done * max(0, self.total - self.done)
            self.rt.say(f"  {phase:>16}  step {step:4d}/{steps}  loss {loss:.3f}  eta {eta:4.0f} s", flush=True)


# ----------------------------------------------------------------------------- entry points


def runtime(cfg):
    """The Runtime of this process: under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set, as
    nanoGPT reads them) it joins the process group, NCCL on CUDA and gloo on the CPU."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    amp = cfg.autocast == "on" or (cfg.autocast == "auto" and cuda)
    return Runtime(device, amp, rank, world, cfg.fsdp and world > 1)


def end_distributed():
    """The end of a torchrun process: destroy the process group, then exit at once, without Python's
    finalization. Under FSDP2 the gloo group outlives destroy_process_group (DTensor's caches hold
    its mesh), and a gloo worker thread that frees a tensor while Python finalizes aborts the process
    ("terminate called without an active exception", pytorch#190489; 1 launch in 5 on 2 busy cores)."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_key(cfg):
    """What makes two runs of one method, lr and seed the same experiment (for resuming a sweep).
    Where files go and which device runs it do not (the cached base is keyed by its own settings)."""
    ignored = ("methods", "lrs", "seeds", "refine", "final_seeds", "base_seeds", "out", "device", "cache")
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ignored}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


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


def prepare_base(cfg, base_seed, rt, progress):
    """(base model, its cache path, its Evaluation): pretrained or cached, measured once."""
    base, path = base_model(cfg, base_seed, rt, progress)
    base.requires_grad_(False)
    test, val = held_out(cfg)
    heldout = heldout_text(cfg)
    data = Evaluation(test, val, heldout, pretraining_skills(base, heldout, rt))
    loss, acc = evaluate(base, test, rt)
    rt.say(f"base model {base_seed}: {data.base_skills[1]:.1%} of 200 arithmetic facts right, held-out "
           f"pretraining loss {data.base_skills[0]:.3f}; on the task: eval loss {loss:.3f}, accuracy {acc:.1%}")
    return base, path, data, (loss, acc)


def run(cfg):
    """The whole experiment. The demo: every method at the paper's learning rates. A sweep: every
    method at each listed lr on seeds 0 .. seeds-1 of the first base model, the lr chosen on
    validation (with refine, after adding the chosen lr / sqrt 2 and * sqrt 2), then with final_seeds
    each method at its chosen lr on that many new seeds of every base. Returns results and checks."""
    rt = runtime(cfg)
    methods, bases, grid_lrs = cfg.methods.split(","), cfg.base_seed_list(), cfg.sweep_lrs() or [None]
    rt.say(f"device {rt.device}, {rt.world} process(es){' (FSDP2)' if rt.fsdp else ''}, bf16 autocast {rt.amp}, "
           f"methods {', '.join(methods)}, rank {cfg.rank}, {cfg.steps} steps, seeds {cfg.seeds}"
           + (f", learning rates {cfg.lrs}, base models {cfg.base_seeds}" if cfg.lrs else ""))
    planned = len(methods) * cfg.seeds * (len(grid_lrs) + 2 * cfg.refine) + len(bases) * len(methods) * cfg.final_seeds
    progress = Progress((len(bases) if cfg.final_seeds else 1) * cfg.pretrain_steps + planned * cfg.steps, rt)
    os.makedirs(cfg.out, exist_ok=True)
    log_path, sweep_path, key = os.path.join(cfg.out, "log.jsonl"), os.path.join(cfg.out, "sweep.jsonl"), run_key(cfg)
    done = finished_runs(sweep_path, key) if cfg.lrs else {}
    if rt.main and not cfg.lrs:
        open(log_path, "w").close()  # a sweep appends to its log; a plain run starts a new one

    def log(row, path=log_path):
        if rt.main:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")

    prepared, results, checks = {}, {}, None  # results: {base: {method: {lr: {seed: result}}}}

    def runs(method, lr, seeds, base_seed):
        """Fine-tune (or find in the sweep log) method at lr on these seeds of one base model."""
        nonlocal checks
        if base_seed not in prepared:
            before = progress.done
            prepared[base_seed] = prepare_base(cfg, base_seed, rt, progress)
            progress.total -= cfg.pretrain_steps - (progress.done - before)  # none when it was cached
        base, base_path, data, _ = prepared[base_seed]
        out = results.setdefault(base_seed, {}).setdefault(method, {}).setdefault(lr, {})
        for seed in seeds:
            if (method, lr, seed, base_seed) in done:
                out[seed] = done[(method, lr, seed, base_seed)]
                progress.total -= cfg.steps
                continue
            out[seed], model = finetune(method, lr, base, data, cfg, seed, rt, progress, log)
            if cfg.lrs:
                log({"key": key, "method": method, "lr": lr, "seed": seed, "base_seed": base_seed,
                     "result": out[seed]}, sweep_path)
            elif method == "sorsa" and seed == 0:
                checks = check_merge_and_adapter(model, base, data.test, cfg, rt, base_path)
        return [out[seed] for seed in seeds]

    first, seeds = bases[0], range(cfg.seeds)
    for lr in grid_lrs:
        for method in methods:
            runs(method, cfg.method_lr(method, lr), seeds, first)
    report = {"base": prepared[first][3], "rt": rt, "log": log_path, "checks": checks}
    grid = {m: {lr: [by_seed[s] for s in seeds] for lr, by_seed in results[first][m].items()} for m in methods}
    if not cfg.lrs:
        return {**report, "results": grid}
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
    batch = next(training_batches(0, cfg, {p for p, _ in prepared[first][2].test + prepared[first][2].val}))
    lambdas = {m: hessian_lambda_max(m, prepared[first][0], batch, cfg, rt) for m in methods}
    return {**report, "results": grid, "final": final, "lambdas": lambdas}


def parse_args(argv=None):
    """A Config from the command line; bad values exit with status 2 and a message."""
    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"default {defaults.device!r}")
    parser.add_argument("--autocast", choices=["auto", "on", "off"], help="bf16 autocast; default 'auto': on CUDA only")
    helps = {"lrs": "sweep: every method at each learning rate (SORSA at the listed lr, not 1.5x; "
                    "gamma = gamma_ratio * lr, so the regularizer's weight stays put); resumes where it stopped",
             "gamma_ratio": "SORSA's gamma / its learning rate (Eq. 6), L_reg the mean over factor matrices "
                            "(the authors' scale): the paper's nominal ratio is 4e-4 / 3e-5 = 13.3, the weight "
                            "its runs had 0.208 (their trainer divided it by 64 accumulation steps)",
             "final_seeds": "sweep: each method at its chosen lr on this many new seeds of every base model, "
                            "compared pairwise with SORSA",
             "base_seeds": "pretraining seeds of the base models, e.g. 0,1,2 (--base_seed 1 works too)"}
    for field in ("methods", "targets", "rank", "steps", "lr", "gamma_ratio", "lrs", "seeds", "final_seeds",
                  "base_seeds", "batch_size", "test_size", "val_size", "pretrain_steps", "out", "cache"):
        value = getattr(defaults, field)
        parser.add_argument(f"--{field}", type=type(value),
                            help=f"{helps.get(field, '')}{'; ' if field in helps else ''}default {value!r}")
    parser.add_argument("--fsdp", action="store_true", default=None, help="under torchrun: FSDP2 (fully_shard) instead of DDP")
    parser.add_argument("--quick", action="store_true", default=None, help="smoke run: short pretraining and fine-tuning")
    parser.add_argument("--refine", action="store_true", default=None,
                        help="sweep: add each method's best lr / sqrt 2 and * sqrt 2, then choose again")
    args = parser.parse_args(argv)
    if args.quick:  # the quick settings, under anything given explicitly
        defaults.shrink_for_quick()
    cfg = dataclasses.replace(defaults, **{k: v for k, v in vars(args).items() if v is not None})
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
    if min(cfg.steps, cfg.seeds, cfg.test_size, cfg.val_size, cfg.pretrain_steps) < 1 or not cfg.lr > 0 \
            or not cfg.gamma_ratio >= 0:
        parser.error("--steps, --seeds, --test_size, --val_size and --pretrain_steps must be >= 1, "
                     "--lr > 0 and --gamma_ratio >= 0")
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
    if (cfg.refine or cfg.final_seeds) and not cfg.lrs:
        parser.error("--refine and --final_seeds belong to a sweep: give --lrs too")
    if cfg.final_seeds < 0:
        parser.error("--final_seeds must be >= 0")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        parser.error(f"--batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    if cfg.fsdp and world == 1:
        parser.error("--fsdp shards across processes: start with torchrun --nproc_per_node N")
    for flag, folder in (("out", cfg.out), ("cache", cfg.cache)):
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as err:
            parser.error(f"cannot write to {folder}: {err.strerror}; pass a writable --{flag}")
    return cfg


def main(argv=None):
    cfg = parse_args(argv)
    start = time.time()
    report = run(cfg)
    rt = report["rt"]
    if rt.main:
        print(f"\nbase model: eval loss {report['base'][0]:.3f}, accuracy {report['base'][1]:.1%}")
        if cfg.lrs:
            print(sweep_table(report["results"], report["lambdas"]))
            if report["final"]:
                print(f"\nAt the chosen learning rates, seeds {cfg.seeds}-{cfg.seeds + cfg.final_seeds - 1}:\n"
                      + comparison_tables(report["final"]))
            plot_sweep(report["results"], cfg.out)
        else:
            print(results_table({method: runs for method, by_lr in report["results"].items()
                                 for runs in by_lr.values()}))
            plot(report["log"], cfg.out)
        if report["checks"]:
            rows, adapter_bytes, base_bytes = report["checks"]
            for label, (acc, diff) in rows.items():
                print(f"SORSA {label}: accuracy {acc:.1%}, max |logit difference| {diff:.2e}")
            print(f"adapter file {adapter_bytes / 1e3:.0f} kB; base model file {base_bytes / 1e3:.0f} kB")
        print(f"log: {report['log']}")
        print(f"total time {time.time() - start:.0f} s")
    if dist.is_initialized():
        end_distributed()


if __name__ == "__main__":
    sys.exit(main())
