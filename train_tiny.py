"""Pretrain a tiny GPT on arithmetic, then fine-tune it on word problems with SORSA, PiSSA, LoRA and
full fine-tuning, side by side: the paper's experiment (section 6) in miniature.

The base model learns sums, differences and products ("12+7=19") and sentences ("ann has 12 pens.")
from a corpus this script generates; the task, which it never saw, is word problems answered with
that arithmetic ("ann has 12 pens and gets 7 more. how many? 12+7=19"), scored like GSM-8K (exact
match of the greedy answer on held-out problems), loss on the answer only. The recipe is the paper's:
AdamW, no weight decay, cosine schedule with 3% warm-up, clipping 1.0, bf16 autocast on CUDA (fp16
with a GradScaler on GPUs without bf16). Each run also measures forgetting: held-out pretraining loss
and arithmetic accuracy against the base.

    python train_tiny.py                  # CPU; the base model is cached for the next run
    python train_tiny.py --device cuda    # GPU
    python train_tiny.py --quick          # smoke run
    python train_tiny.py --seeds 3        # every method on seeds 0-2: mean +- std
    torchrun --standalone --nproc_per_node 2 train_tiny.py      # DDP

Top to bottom: data, model, methods, settings, where it runs, the base model, evaluation,
fine-tuning (SORSA's lines are in its loop), report.
"""

import argparse
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure  # plots drawn straight to files: no pyplot, no display

import sorsa
import sorsa_integrations as si

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

def fact(rng):
    """(a, op, b, a op b): what the base model learns, sums and differences to 10, products to 9 x 9."""
    op = rng.choice("+-*")
    a = rng.randint(2, 9) if op == "*" else rng.randint(0, 10)
    b = rng.randint(2, 9) if op == "*" else rng.randint(0, a) if op == "-" else rng.randint(0, 10)
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op]

def pretrain_line(rng):
    """One line of the base corpus: an arithmetic fact (4 lines in 5), or a plain sentence."""
    a, op, b, c = fact(rng)
    if rng.random() < 0.8:
        return f"{a}{op}{b}={c}"
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    return rng.choice([f"{name} has {a} {item}.", f"{name} gets {b} {item}.",
                       f"{name} gives away {b} {item}.", f"{name} has {a} bags of {b} {item}."])

def word_problem(rng):
    """(prompt, answer): a question the base model never saw; the answer writes the arithmetic
    out as the base model learned it ("7+5=12"), like a worked solution in MetaMathQA."""
    a, op, b, c = fact(rng)
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    text = {"+": f"{name} has {a} {item} and gets {b} more.",
            "-": f"{name} has {a} {item} and gives away {b}.",
            "*": f"{name} has {a} bags of {b} {item}."}[op]
    return f"{text} how many?", f"{a}{op}{b}={c}"

def test_problems(cfg):
    """The held-out problems the methods are scored on; training never draws their prompts."""
    return [word_problem(random.Random(f"test {i}")) for i in range(cfg.test_size)]

def training_batches(seed, cfg, exclude):
    """The fine-tuning stream of one seed: the same problems in the same order for every method
    and learning rate; each a list of cfg.batch_size problems (the global batch), none in exclude."""
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
        d = cfg.d_model
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(cfg)
        self.up_proj, self.down_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

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

# ----------------------------------------------------------------------------- the methods

class LowRankLinear(nn.Module):
    """y = x W^T + (x A^T) B^T + b, W frozen: LoRA (W = W_0, B = 0), PiSSA (W = W_r). As in SORSALinear,
    `weight` is the frozen part and merge() the layer it computes."""

    def __init__(self, W, A, B, bias):
        super().__init__()
        self.weight = nn.Parameter(W.detach().clone(), requires_grad=False)  # (m, n)
        self.A, self.B = nn.Parameter(A.detach().clone()), nn.Parameter(B.detach().clone())  # (r, n), (m, r)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def lora(cls, linear, rank):
        """LoRA: A Kaiming-uniform, B = 0, scaling 1, so the model starts unchanged."""
        A = nn.init.kaiming_uniform_(linear.weight.new_empty(rank, linear.in_features), a=math.sqrt(5))
        return cls(linear.weight, A, A.new_zeros(linear.out_features, rank), linear.bias)

    @classmethod
    def pissa(cls, linear, rank):
        """PiSSA: SORSA's split with sqrt(S_p) folded into both factors, no regularizer."""
        U_p, S_p, Vt_p, W_r = sorsa.svd_split(linear.weight, rank)
        root = S_p.sqrt()
        return cls(W_r, root[:, None] * Vt_p, U_p * root, linear.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.A), self.B)

    def merge(self):
        """A frozen nn.Linear with weight W + B A."""
        layer = nn.Linear(self.A.shape[1], self.B.shape[0], bias=self.bias is not None, device="meta")
        layer.weight = nn.Parameter(self.weight + self.B @ self.A, requires_grad=False)
        layer.bias = None if self.bias is None else nn.Parameter(self.bias.clone(), requires_grad=False)
        return layer

def target_names(model, targets):
    """The names of the model's nn.Linear layers whose last part is in targets."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]

def adapt_low_rank(init, model, rank, targets):
    """Each target nn.Linear replaced by init(linear, rank) (LowRankLinear.lora or .pissa): only A, B train."""
    model.requires_grad_(False)
    for name in target_names(model, targets):
        model.set_submodule(name, init(model.get_submodule(name), rank))

@dataclass(frozen=True)
class Method:
    adapt: callable  # adapt(model, rank, targets): makes a copy of the base model trainable the method's way
    lr_scale: float = 1.0  # trained at Config.lr times this: SORSA 1.5x, as the paper's 3e-5 vs 2e-5
    regularized: bool = False  # SORSA's Eq. 6 with gamma = Config.gamma_ratio * lr

METHODS = {
    "sorsa": Method(sorsa.apply_sorsa, 1.5, regularized=True),  # trainable U_p, S_p, Vt_p, frozen W_r
    "sorsa_g0": Method(sorsa.apply_sorsa, 1.5),  # SORSA without its regularizer: gamma = 0
    "pissa": Method(functools.partial(adapt_low_rank, LowRankLinear.pissa)),
    "lora": Method(functools.partial(adapt_low_rank, LowRankLinear.lora)),
    "full": Method(lambda model, rank, targets: model.requires_grad_(True)),
}

def prepare(method, base, cfg):
    """A fresh copy of the base model, set up for `method`."""
    model = copy.deepcopy(base)
    METHODS[method].adapt(model, cfg.rank, cfg.targets.split(","))
    return model

# ----------------------------------------------------------------------------- the run's settings

@dataclass
class Config:
    device: str = "auto"  # auto: cuda when available
    autocast: str = "auto"  # auto: on CUDA only, bf16 (fp16 + GradScaler without bf16); on (bf16); fp16; off
    methods: str = ",".join(METHODS)
    targets: str = ",".join(BLOCK_LINEARS)  # adapted layers, in every block
    rank: int = 8
    steps: int = 300  # fine-tuning steps per method
    lr: float = 2e-3  # LoRA, PiSSA and full fine-tuning; SORSA gets 1.5x, as in the paper (3e-5 vs 2e-5)
    # gamma / SORSA's lr, L_reg the mean over every U_p and Vt_p (the authors' scale): chosen on validation
    # over the paper's effective 0.208 (as good: not established either way) to its nominal 13.3 (docs/gamma.md)
    gamma_ratio: float = 0.4
    batch_size: int = 32  # the global batch; under torchrun each rank takes its share
    seeds: int = 1  # repeat every method with seeds 0 .. seeds-1; mean +- std
    base_seed: int = 0  # pretraining seed of the base model
    test_size: int = 200  # held-out word problems
    pretrain_steps: int = 2500
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    out: str = "runs/tiny"  # log, plot, adapter
    cache: str = "runs/cache"  # pretrained base models, keyed by their configuration
    curve: bool = True  # test scores at 5 points of each run, for the plot; else at its end only
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)

    def gamma(self, method, lr):
        """Eq. 6's gamma at learning rate lr: gamma / lr stays gamma_ratio; 0 for an unregularized method."""
        return self.gamma_ratio * lr if METHODS[method].regularized else 0.0

QUICK = dict(model=GPTConfig(n_layer=2, d_model=64), pretrain_steps=300, steps=40, test_size=100)
CHOICES = {"device": ["auto", "cpu", "cuda"], "autocast": ["auto", "on", "fp16", "off"]}

def check(cfg, error):
    """Call error(message) for settings that cannot run here."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        error("--device cuda, but this PyTorch sees no CUDA GPU; use --device cpu (or auto)")
    for flag, names, known in (("method", cfg.methods, METHODS), ("target", cfg.targets, BLOCK_LINEARS)):
        unknown = set(names.split(",")) - set(known)
        if unknown:
            error(f"unknown {flag}(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    if not 1 <= cfg.rank <= cfg.model.d_model:
        error(f"--rank {cfg.rank} is outside [1, {cfg.model.d_model}]: the smallest adapted layer is "
              f"{cfg.model.d_model}x{cfg.model.d_model}")
    if min(cfg.steps, cfg.seeds, cfg.test_size, cfg.pretrain_steps, cfg.batch_size) < 1 or not cfg.lr > 0:
        error("--steps, --seeds, --test_size, --pretrain_steps and --batch_size must be >= 1, --lr > 0")
    if cfg.batch_size % int(os.environ.get("WORLD_SIZE", 1)):
        error(f"--batch_size {cfg.batch_size} must be a multiple of the {os.environ['WORLD_SIZE']} processes")
    for flag in ("out", "cache"):
        try:
            os.makedirs(getattr(cfg, flag), exist_ok=True)
        except OSError as err:
            error(f"cannot write to {getattr(cfg, flag)}: {err.strerror}; pass a writable --{flag}")

def argument_parser():
    """A flag for each flat setting of Config (the model's shape stays as it is), and --quick."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in dataclasses.fields(Config):
        if field.type in (str, int, float):
            parser.add_argument(f"--{field.name}", type=type(field.default), choices=CHOICES.get(field.name),
                                help=f"default {field.default!r}")
    parser.add_argument("--quick", action="store_true", help="smoke run: a smaller model, fewer steps")
    return parser

def parse_args(argv=None, parser=None, kind=Config):
    """The settings (a kind: Config, or theory/comparison.py's) of a command line parsed by parser (default:
    argument_parser()'s), --quick's under the flags given, checked; bad values exit with status 2."""
    parser = parser or argument_parser()
    args = vars(parser.parse_args(argv))
    given = {k: v for k, v in args.items() if v is not None and k != "quick"}
    cfg = kind(**{**(QUICK if args["quick"] else {}), **given})  # given flags win
    check(cfg, parser.error)
    return cfg

# ----------------------------------------------------------------------------- where it runs: devices and processes

@dataclass
class Runtime:
    """Where a run computes: device, autocast (amp, in amp_dtype), and its place among torchrun's processes."""
    device: torch.device
    amp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16  # float16 on GPUs without bf16 (T4, V100): with a GradScaler
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.main:
            print(*args, **kwargs)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def grad_scaler(self):
        """A new GradScaler, enabled under fp16 autocast only (whose range flushes small gradients to 0)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp and self.amp_dtype == torch.float16)

def start_runtime(cfg):
    """The Runtime of this process: under torchrun (RANK, WORLD_SIZE and LOCAL_RANK set, as
    nanoGPT reads them) it joins the process group, NCCL on CUDA and gloo on the CPU."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    amp = cfg.autocast in ("on", "fp16") or (cfg.autocast == "auto" and cuda)
    no_bf16 = cfg.autocast == "auto" and cuda and not torch.cuda.is_bf16_supported(including_emulation=False)
    amp_dtype = torch.float16 if cfg.autocast == "fp16" or no_bf16 else torch.bfloat16
    return Runtime(device, amp, amp_dtype, rank, world)

def distribute(model, runtime):
    """The model as it trains under torchrun: wrapped in DDP (every rank holds it whole); alone, as it is."""
    if runtime.world == 1:
        return model
    cuda = runtime.device.type == "cuda"
    return nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device.index] if cuda else None)

# ----------------------------------------------------------------------------- the base model, cached

def pretrain_chunks(rng, cfg, n):
    """n windows (n, T + 1) of the base corpus, each cut at random from a fresh 12-line document."""
    T = cfg.model.block_size
    text = [encode("\n".join(pretrain_line(rng) for _ in range(12))) for _ in range(n)]
    starts = [rng.randrange(len(t) - T) for t in text]
    return torch.tensor([t[s:s + T + 1] for t, s in zip(text, starts)])

def pretraining_batches(cfg, base_seed):
    """The batches (B, T + 1) pretraining draws for a base seed, one per step, in order."""
    rng = random.Random(base_seed)
    return (pretrain_chunks(rng, cfg, cfg.pretrain_batch) for _ in range(cfg.pretrain_steps))

def heldout_text(cfg, n=256):
    """n windows (n, T + 1) of the base corpus from a stream of their own: never drawn in pretraining."""
    return pretrain_chunks(random.Random("held-out pretraining text"), cfg, n)

def lm_loss(model, chunk, runtime):
    """Next-character cross-entropy at every position of windows (B, T + 1): pretraining's loss."""
    with runtime.autocast():
        logits = model(chunk[:, :-1])  # (B, T, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten())

def pretrain(cfg, base_seed, device):
    """(TinyGPT trained on the generated corpus in float32, its final loss), seeded by base_seed."""
    torch.manual_seed(base_seed)
    model = TinyGPT(cfg.model).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    schedule, float32 = sorsa.cosine_schedule(opt, cfg.pretrain_steps), Runtime(device)  # no autocast
    for step, chunk in enumerate(pretraining_batches(cfg, base_seed), start=1):
        loss = lm_loss(model, chunk.to(device), float32)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % max(1, cfg.pretrain_steps // 10) == 0:
            print(f"  pretrain step {step:5d}/{cfg.pretrain_steps}  loss {loss.item():.3f}", flush=True)
    return model, loss.item()

def base_model(cfg, base_seed, runtime):
    """(the base model pretrained with base_seed, its cache file): loaded where an intact file (its checksum
    and configuration checked) is cached, else pretrained and cached; under torchrun by rank 0 alone."""
    key = json.dumps({"model": dataclasses.asdict(cfg.model), "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr,
                      "batch": cfg.pretrain_batch, "vocab": VOCAB, "base_seed": base_seed,
                      "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    path = os.path.join(cfg.cache, f"tiny_gpt_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if runtime.main:
        try:
            cached = si.load_checked(path)[1].get("key") == key  # a damaged file raises: pretrained again
        except Exception:
            cached = False
        if not cached:
            runtime.say(f"base model {base_seed}: pretraining {cfg.pretrain_steps} steps, cached as {path}")
            model, loss = pretrain(cfg, base_seed, runtime.device)
            os.makedirs(cfg.cache, exist_ok=True)
            si.save_checked({k: v.cpu() for k, v in model.state_dict().items()}, path, key=key, loss=loss)
    if runtime.world > 1:
        dist.barrier()  # the others load what rank 0 made
    state, extra = si.load_checked(path)
    model = TinyGPT(cfg.model)
    model.load_state_dict(state)
    runtime.say(f"base model {base_seed}: {path} (pretraining loss {extra['loss']:.3f})")
    return model.to(runtime.device), path

# ----------------------------------------------------------------------------- evaluation

@dataclass
class EvalData:
    """What every fine-tuning run on one base model is measured on, and the base model's own scores."""
    test: list  # (prompt, answer) word problems, reported
    heldout: torch.Tensor  # (B, T + 1) pretraining text never trained on: forgetting
    base_skills: tuple  # the base model's (held-out loss, arithmetic accuracy)
    exclude: set  # prompts that training never draws (the test set's; theory/comparison.py adds others)

@torch.no_grad()
def greedy(model, prompts, new_tokens, runtime):
    """The greedy continuation of each prompt, up to its first newline."""
    by_length = {}
    for i, prompt in enumerate(prompts):  # batch prompts of one length: no padding inside a prompt
        by_length.setdefault(len(prompt), []).append(i)
    out = [None] * len(prompts)
    for length, rows in by_length.items():
        idx = torch.tensor([encode(prompts[i]) for i in rows], device=runtime.device)  # (B, length)
        for _ in range(new_tokens):
            with runtime.autocast():
                nxt = model(idx)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
        for i, ids in zip(rows, idx.tolist()):
            out[i] = decode(ids[length:]).split("\n")[0]
    return out

def answer_loss(model, batch, runtime, divisor=None):
    """Cross-entropy on the answer tokens, summed and divided by `divisor` (default: this batch's token count)."""
    x, y, mask = batch
    with runtime.autocast():
        logits = model(x)
    return F.cross_entropy(logits.float()[mask], y[mask], reduction="sum") / (divisor or mask.sum())

@torch.no_grad()  # TinyGPT has no dropout: train and eval mode compute the same, so the mode is left alone
def evaluate(model, problems, runtime):
    """(eval loss on the answers, exact-match accuracy of greedy answers) on held-out problems."""
    loss = answer_loss(model, problem_batch(problems, runtime.device), runtime).item()
    answers = greedy(model, [p + " " for p, _ in problems], 8, runtime)  # 8: "10+10=20", the longest answer
    # exact match of the final number, as GSM-8K scores the number after "####"
    correct = sum(got.split("=")[-1] == a.split("=")[-1] for got, (_, a) in zip(answers, problems))
    return loss, correct / len(problems)

def arithmetic_accuracy(model, runtime, n=200):
    """Share of n random facts ("7+5=") that the model completes correctly: what pretraining taught."""
    rng = random.Random("facts")
    facts = [fact(rng) for _ in range(n)]
    got = greedy(model, [f"\n{a}{op}{b}=" for a, op, b, _ in facts], 3, runtime)
    return sum(g == str(c) for g, (*_, c) in zip(got, facts)) / n

@torch.no_grad()
def pretraining_skills(model, heldout, runtime):
    """(loss on held-out pretraining text, arithmetic accuracy): what fine-tuning may make a model forget."""
    return lm_loss(model, heldout.to(runtime.device), runtime).item(), arithmetic_accuracy(model, runtime)

def forgetting(model, data, runtime):
    """(rise of the held-out pretraining loss, change of arithmetic accuracy) against the base model."""
    loss, arithmetic = pretraining_skills(model, data.heldout, runtime)
    return loss - data.base_skills[0], arithmetic - data.base_skills[1]

@torch.no_grad()
def weight_change(model, base, names):
    """Mean delta_sigma and delta_d (Eqs. 7-10) of the adapted layers against the base model."""
    layers = [sorsa.unwrap(model).get_submodule(n) for n in names]
    # the (m, n) weight each layer applies, whatever method built it
    pairs = [(base.get_submodule(n).weight, layer.merge().weight if hasattr(layer, "merge") else layer.weight)
             for n, layer in zip(names, layers)]
    if not all(torch.isfinite(b).all() for _, b in pairs):  # diverged (too large a learning rate)
        return math.nan, math.nan
    return (statistics.mean(sorsa.delta_sigma(a, b) for a, b in pairs),
            statistics.mean(sorsa.delta_d(a, b) for a, b in pairs))

def append_jsonl(path, row, runtime):
    """Append one JSON line to a log (rank 0 only; none without a path)."""
    if path and runtime.main:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

def scores(model, base, data, cfg, runtime, row, log_path):
    """row with the test set's eval loss and accuracy and delta_sigma, delta_d, appended to the log."""
    row["eval_loss"], row["accuracy"] = evaluate(model, data.test, runtime)
    row["delta_sigma"], row["delta_d"] = weight_change(model, base, target_names(base, cfg.targets.split(",")))
    append_jsonl(log_path, row, runtime)
    return row

# ----------------------------------------------------------------------------- fine-tuning: the lines to copy

def batch_loss(model, problems, runtime):
    """This rank's share of a global batch's answer loss: its problems' summed loss divided by the global
    batch's answer tokens over the world size, so that DDP's mean of the ranks' gradients is one process's."""
    divisor = sum(len(a) + 1 for _, a in problems) / runtime.world  # " answer\n"
    return answer_loss(model, problem_batch(problems[runtime.rank::runtime.world], runtime.device), runtime, divisor)

def finetune(method, lr, base, data, cfg, seed, runtime, log_path=None):
    """Fine-tune one method with one seed at learning rate lr on one base model (data: its EvalData), the
    paper's recipe; the reported numbers and the model. log_path gets the test scores (Config.curve)."""
    torch.manual_seed(seed)  # LoRA's initialization
    model = distribute(prepare(method, base, cfg), runtime)  # SORSA: sorsa.apply_sorsa (METHODS)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule, scaler = sorsa.cosine_schedule(opt, cfg.steps), runtime.grad_scaler()  # scaler: fp16 only
    gamma = cfg.gamma(method, lr)  # Eq. 6's gamma: gamma / lr_max = cfg.gamma_ratio for SORSA, else 0
    losses, seconds = [], 0.0
    for step, problems in enumerate(training_batches(seed, cfg, data.exclude), start=1):
        start = time.perf_counter()
        loss = batch_loss(model, problems, runtime)
        opt.zero_grad()
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # fp16: unscaled before the clip, and before L_reg's gradient joins it
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if gamma > 0:  # SORSA: (gamma / lr_max) grad L_reg added after the clip, as the authors do (Eq. 6)
            sorsa.add_regularizer_grad(model, gamma, lr)
        scaler.step(opt)  # skipped where fp16's scaled gradient overflowed
        scaler.update()
        schedule.step()
        seconds += time.perf_counter() - start
        loss = loss.detach()
        if runtime.world > 1:
            dist.all_reduce(loss)  # the ranks' mean (divided below): the global batch's loss
        losses.append(loss.item() / runtime.world)
        if step % max(1, cfg.steps // 10) == 0:
            runtime.say(f"  {method:>8} seed {seed}  step {step:4d}/{cfg.steps}  loss {losses[-1]:.3f}", flush=True)
        on_curve = cfg.curve and (step == 1 or step % max(1, cfg.steps // 5) == 0)
        if on_curve or step == cfg.steps:  # the test scores, for the plot; the last for the table
            row = {"method": method, "lr": lr, "seed": seed, "step": step, "train_loss": losses[-1]}
            last = scores(model, base, data, cfg, runtime, row, log_path)
    forget_loss, forget_arithmetic = forgetting(model, data, runtime)
    tail = losses[-max(1, cfg.steps // 10):]  # the last tenth of the steps
    result = {key: last[key] for key in ("lr", "eval_loss", "accuracy", "delta_sigma", "delta_d")}
    return {**result, "params": sum(p.numel() for p in params), "train_loss": statistics.mean(tail),
            "forget_loss": forget_loss, "forget_arithmetic": forget_arithmetic,
            "ms_per_step": 1e3 * seconds / cfg.steps}, model

# ----------------------------------------------------------------------------- the report

@torch.no_grad()
def check_merge_and_adapter(model, base, test, cfg, runtime, base_path):
    """The SORSA model saved as an adapter and reloaded into a fresh base, and merged in place into plain
    nn.Linear layers, against the trained one: accuracy, logits, file sizes (printed, and returned)."""
    model = sorsa.unwrap(model)  # DDP's wrapper is for training
    x = problem_batch(test, runtime.device)[0]
    logits = model(x).float()
    path = os.path.join(cfg.out, "sorsa_adapter.pt")
    si.save_adapter(model, path)  # rank 0 writes, atomically with a checksum; every rank waits for it
    reloaded = copy.deepcopy(base)
    si.load_adapter(reloaded, path)  # checksum checked
    sorsa.merge_sorsa(model)  # the last use of the trained model
    rows = {}
    for label, m in (("merged", model), ("reloaded", reloaded)):
        diff = (m(x).float() - logits).abs().max().item()
        rows[label] = (evaluate(m, test, runtime)[1], diff)
        runtime.say(f"SORSA {label}: accuracy {rows[label][0]:.1%}, max |logit difference| {diff:.2e}")
    sizes = os.path.getsize(path), os.path.getsize(base_path)
    runtime.say(f"adapter file {sizes[0] / 1e3:.0f} kB; base model file {sizes[1] / 1e3:.0f} kB")
    return rows, *sizes

COLUMNS = [("train loss", "train_loss", "{:.3f}"), ("eval loss", "eval_loss", "{:.3f}"),
           ("accuracy", "accuracy", "{:.1%}"), ("Δ held-out loss", "forget_loss", "{:+.3f}"),
           ("Δ arithmetic", "forget_arithmetic", "{:+.1%}"), ("delta_sigma", "delta_sigma", "{:.4f}"),
           ("delta_d", "delta_d", "{:.4f}"), ("ms/step", "ms_per_step", "{:.1f}")]

def cell(runs, key, fmt):
    """mean +- std of runs[i][key] over the runs (seeds)."""
    values = [r[key] for r in runs]
    text = fmt.format(statistics.mean(values))
    return text + (f" ± {fmt.format(statistics.stdev(values)).lstrip('+')}" if len(values) > 1 else "")

def results_table(results):
    """Markdown table: one row per method ({method: runs}), mean +- std over seeds."""
    lines = ["| method | trainable params | " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 2) + "|"]
    for method, runs in results.items():
        cells = " | ".join(cell(runs, key, fmt) for _, key, fmt in COLUMNS)
        lines.append(f"| {method} | {runs[0]['params']:,} | {cells} |")
    return "\n".join(lines)

def plot(log_path, out):
    """curves.png: eval loss, delta_sigma and delta_d against the step, per method (seed 0)."""
    with open(log_path) as f:
        rows = [json.loads(line) for line in f]
    fig = Figure(figsize=(15, 4))
    for ax, key in zip(fig.subplots(1, 3), ("eval_loss", "delta_sigma", "delta_d")):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(r["step"], r[key]) for r in rows if r["method"] == method and r["seed"] == 0]
            ax.plot(*zip(*points), label=method)
        ax.set(xlabel="step", title=key, yscale="log" if key == "eval_loss" else "linear")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    print(f"plot: {os.path.join(out, 'curves.png')}")

def prepare_base(cfg, base_seed, runtime):
    """(base model, its cache path, its EvalData, its (eval loss, accuracy) on the task), measured once."""
    base, path = base_model(cfg, base_seed, runtime)
    base.requires_grad_(False)
    test, heldout = test_problems(cfg), heldout_text(cfg)
    data = EvalData(test, heldout, pretraining_skills(base, heldout, runtime), {p for p, _ in test})
    loss, acc = evaluate(base, test, runtime)
    runtime.say(f"base model {base_seed}: {data.base_skills[1]:.1%} of 200 arithmetic facts right, held-out "
                f"pretraining loss {data.base_skills[0]:.3f}; on the task: eval loss {loss:.3f}, accuracy {acc:.1%}")
    return base, path, data, (loss, acc)

def run(cfg):
    """The demo: every method on seeds 0 .. seeds-1 of one base model, the table and the plot, then SORSA's
    seed-0 model saved, reloaded and merged. Returns what it printed: base scores, results, checks."""
    start, runtime = time.time(), start_runtime(cfg)
    runtime.say(f"device {runtime.device}, {runtime.world} process(es), autocast "
                f"{str(runtime.amp_dtype).removeprefix('torch.') if runtime.amp else 'off'}, methods "
                f"{cfg.methods.replace(',', ', ')}, rank {cfg.rank}, {cfg.steps} steps, seeds {cfg.seeds}")
    base, base_path, data, base_scores = prepare_base(cfg, cfg.base_seed, runtime)
    os.makedirs(cfg.out, exist_ok=True)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if runtime.main:
        open(log_path, "w").close()
    results, checks = {}, None
    for method in cfg.methods.split(","):
        for seed in range(cfg.seeds):
            lr = METHODS[method].lr_scale * cfg.lr
            result, model = finetune(method, lr, base, data, cfg, seed, runtime, log_path)
            results.setdefault(method, []).append(result)
            if method == "sorsa" and seed == 0:
                sorsa_model = model  # checked once the table is out
    runtime.say(f"\nbase model: eval loss {base_scores[0]:.3f}, accuracy {base_scores[1]:.1%}")
    runtime.say(results_table(results))
    if runtime.main:
        plot(log_path, cfg.out)
    if "sorsa" in results:
        checks = check_merge_and_adapter(sorsa_model, base, data.test, cfg, runtime, base_path)
    runtime.say(f"log: {log_path}\ntotal time {time.time() - start:.0f} s")
    return {"base": base_scores, "runtime": runtime, "log": log_path, "checks": checks, "results": results}

def main(argv=None):
    run(parse_args(argv))
    if dist.is_initialized():
        si.end_distributed()  # not a plain destroy_process_group: its docstring says why

if __name__ == "__main__":
    main()
