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
    torchrun --standalone --nproc_per_node 2 train_tiny.py      # DDP (add --fsdp for FSDP2)

Top to bottom: data, model, methods, settings, where it runs, the training step (the lines to copy),
the base model, evaluation, fine-tuning, report.
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
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from matplotlib.figure import Figure  # plots drawn straight to files: no pyplot, no display
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

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

def held_out(cfg):
    """(test problems, validation problems): disjoint, and never drawn for training. The comparison
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
class EvalData:
    """The data every fine-tuning run on one base model is measured on, and the base model's scores."""
    test: list  # (prompt, answer) word problems, reported
    val: list  # other word problems, on which the comparison picks each method's learning rate
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

# ----------------------------------------------------------------------------- the methods

def whole(tensor):
    """An FSDP2 shard (DTensor) gathered from every rank; a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

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
        """A frozen nn.Linear with weight W + B A (FSDP2's shards gathered)."""
        W, A, B = (whole(t) for t in (self.weight, self.A, self.B))
        layer = nn.Linear(W.shape[1], W.shape[0], bias=self.bias is not None, device="meta")  # shapes only
        layer.weight = nn.Parameter(W + B @ A, requires_grad=False)
        layer.bias = None if self.bias is None else nn.Parameter(whole(self.bias).clone(), requires_grad=False)
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
    "sorsa": Method(sorsa.apply_sorsa, 1.5, regularized=True),  # trainable U_p, S_p, Vt_p, frozen W_r (sorsa.py)
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
    test_size: int = 200  # held-out word problems, reported
    val_size: int = 200  # other held-out problems, on which theory/comparison.py picks each learning rate
    pretrain_steps: int = 2500
    pretrain_batch: int = 16
    pretrain_lr: float = 3e-3
    autocast: str = "auto"  # auto: CUDA only, bf16 (fp16 + GradScaler without bf16); on (bf16), fp16, off
    fsdp: bool = False  # under torchrun: FSDP2 (fully_shard) instead of DDP
    out: str = "runs/tiny"  # log, plot, adapter
    cache: str = "runs/cache"  # pretrained base models, keyed by their configuration
    quick: bool = False  # smoke run: fewer steps everywhere
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)
    FLAGS = ("methods", "targets", "rank", "steps", "lr", "gamma_ratio", "seeds", "base_seed", "batch_size",
             "test_size", "val_size", "pretrain_steps", "out", "cache")  # plain --flags (a class attribute)

    def gamma(self, method, lr):
        """Eq. 6's gamma at learning rate lr: gamma / lr stays gamma_ratio; 0 for an unregularized method."""
        return self.gamma_ratio * lr if METHODS[method].regularized else 0.0

QUICK = dict(model=GPTConfig(n_layer=2, d_model=64), pretrain_steps=300, steps=40, test_size=100, val_size=100)

CHOICES = {"device": ["auto", "cpu", "cuda"], "autocast": ["auto", "on", "fp16", "off"]}
HELP = {"autocast": "auto: on CUDA only, in bf16, or in fp16 with a GradScaler where the GPU has no native bf16 "
                    "(T4, V100); on: bf16;",
        "gamma_ratio": "SORSA's gamma / its lr (Eq. 6), L_reg the mean over factor matrices (the authors' scale): "
                       "the paper's nominal 13.3, the effective 0.208 its runs had (their trainer divided by 64 "
                       "steps: docs/gamma.md);",
        "fsdp": "under torchrun: FSDP2 (fully_shard) instead of DDP",
        "quick": "smoke run: short pretraining and fine-tuning"}

def argument_parser(defaults, description=__doc__):
    """The demo's command-line flags, defaults from a Config (theory/comparison.py adds its own)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for field in ("device", "autocast", *defaults.FLAGS):
        value = getattr(defaults, field)
        parser.add_argument(f"--{field}", type=type(value), choices=CHOICES.get(field),
                            help=f"{HELP.get(field, '')} default {value!r}".strip())
    for switch in ("fsdp", "quick"):
        parser.add_argument(f"--{switch}", action="store_true", default=None, help=HELP[switch])
    return parser

def parse_args(argv=None, defaults=None, parser=None):
    """The Config the command line gives (--quick's settings under anything given explicitly); bad values
    exit with status 2 and a message. theory/comparison.py passes its own defaults and parser."""
    defaults = defaults or Config()
    parser = parser or argument_parser(defaults)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    cfg = dataclasses.replace(defaults, **{**(QUICK if args.quick else {}), **given})  # given flags win
    if cfg.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but this PyTorch sees no CUDA GPU; use --device cpu (or auto)")
    for flag, names, known in (("method", cfg.methods, METHODS), ("target", cfg.targets, BLOCK_LINEARS)):
        unknown = set(names.split(",")) - set(known)
        if unknown:
            parser.error(f"unknown {flag}(s) {', '.join(sorted(unknown))}; choose from {', '.join(known)}")
    if not 1 <= cfg.rank <= cfg.model.d_model:
        parser.error(f"--rank {cfg.rank} is outside [1, {cfg.model.d_model}]: the smallest adapted layer "
                     f"is {cfg.model.d_model}x{cfg.model.d_model}")
    if min(cfg.steps, cfg.seeds, cfg.test_size, cfg.val_size, cfg.pretrain_steps) < 1 or not cfg.lr > 0 \
            or not cfg.gamma_ratio >= 0 or cfg.base_seed < 0:
        parser.error("--steps, --seeds, --test_size, --val_size and --pretrain_steps must be >= 1, "
                     "--lr > 0, --gamma_ratio >= 0 and --base_seed >= 0")
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % world:
        parser.error(f"--batch_size {cfg.batch_size} must be a multiple of the {world} processes")
    if cfg.fsdp and world == 1:
        parser.error("--fsdp shards across processes: start with torchrun --nproc_per_node N")
    for flag, folder in (("out", cfg.out), ("cache", cfg.cache)):
        try:
            os.makedirs(folder, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as err:
            parser.error(f"cannot write to {folder}: {err.strerror}; pass a writable --{flag}")
    return cfg

# ----------------------------------------------------------------------------- where it runs: devices and processes

@dataclass
class Runtime:
    """Where a run computes: device, autocast (amp, in amp_dtype), and its place among torchrun's processes."""
    device: torch.device
    amp: bool = False
    rank: int = 0
    world: int = 1
    fsdp: bool = False
    amp_dtype: torch.dtype = torch.bfloat16  # float16 on GPUs without bf16 (T4, V100): trained with a GradScaler

    @property
    def main(self):
        return self.rank == 0

    def say(self, *args, **kwargs):
        """print, on rank 0 only."""
        if self.main:
            print(*args, **kwargs)

    def progress(self, phase, step, steps, loss):
        """Step and loss about every 5% of a phase's steps (rank 0)."""
        if step == steps or step % max(1, steps // 20) == 0:
            self.say(f"  {phase:>16}  step {step:4d}/{steps}  loss {loss:.3f}", flush=True)

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
    return Runtime(device, amp, rank, world, cfg.fsdp and world > 1, amp_dtype)

def describe(cfg, runtime):
    """One line saying what this run computes, and where."""
    return (f"device {runtime.device}, {runtime.world} process(es){' (FSDP2)' if runtime.fsdp else ''}, "
            f"autocast {str(runtime.amp_dtype).removeprefix('torch.') if runtime.amp else 'off'}, "
            f"methods {cfg.methods.replace(',', ', ')}, rank {cfg.rank}, "
            f"{cfg.steps} steps, seeds {cfg.seeds}")

def distribute(model, runtime):
    """The model as it trains under torchrun: DDP, or FSDP2 by block (SORSA's Vt_p by columns,
    so its regularizer needs only r x r all-reduces); as it is in one process."""
    if runtime.world == 1:
        return model
    if not runtime.fsdp:
        cuda = runtime.device.type == "cuda"
        return nn.parallel.DistributedDataParallel(model, device_ids=[runtime.device.index] if cuda else None)
    placement = si.fsdp_shard_placement(model)
    for block in model.blocks:
        fully_shard(block, shard_placement_fn=placement)
    fully_shard(model, shard_placement_fn=placement)
    return model

def sorsa_sharded(method, base, cfg, runtime):
    """SORSA under FSDP2 as a model too large for one process is adapted: made on the meta device, given
    SORSA's structure there, sharded by block, the base weights loaded into the shards, then split, each
    rank splitting every world-th layer (sorsa_integrations.split_sharded). No rank holds the whole model."""
    with torch.device("meta"):
        model = TinyGPT(cfg.model)
    METHODS[method].adapt(model, cfg.rank, cfg.targets.split(","))  # shapes only: nothing is computed on meta
    distribute(model, runtime).to_empty(device=runtime.device)
    set_model_state_dict(model, si.base_state_for_sorsa(model, base.state_dict()),
                         options=StateDictOptions(full_state_dict=True, strict=False))  # U_p, S_p, Vt_p: the split's
    si.split_sharded(model)
    return model

# ----------------------------------------------------------------------------- the training step: the lines to copy
# SORSA's own lines, all told: the layers (METHODS' sorsa.apply_sorsa), the optimizer over the trainable factors
# (finetune), gamma and its peak lr (Config.gamma, finetune), and the regularizer's gradient here.

def answer_loss(model, batch, runtime, divisor=None):
    """Cross-entropy on the answer tokens, summed and divided by `divisor` (default: this batch's token count)."""
    x, y, mask = batch
    with runtime.autocast():
        logits = model(x)
    return F.cross_entropy(logits.float()[mask], y[mask], reduction="sum") / (divisor or mask.sum())

def optimizer_step(model, opt, params, loss, scaler, gamma=0.0, lr_max=None):
    """One step of the paper's recipe, in the authors' order: backward, the gradient clipped to norm 1.0,
    (gamma / lr_max) grad L_reg added unclipped (Eq. 6; lr_max: the schedule's peak lr), the optimizer's step.
    scaler: Runtime.grad_scaler()'s, whose calls do nothing but outside fp16 autocast."""
    opt.zero_grad()
    scaler.scale(loss).backward()
    scaler.unscale_(opt)  # fp16: unscaled before the clip; L_reg's gradient added to a scaled one would vanish
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    if gamma > 0:
        sorsa.add_regularizer_grad(model, gamma, lr_max)  # Eq. 6's second term
    scaler.step(opt)  # skipped where fp16's scaled gradient overflowed
    scaler.update()

def train_step(model, opt, params, problems, gamma, lr_max, runtime, scaler):
    """One step on a global batch of problems: this rank's share of the answer loss, then the paper's
    step (optimizer_step). Returns the global batch's answer loss."""
    # This rank's problems; its summed loss divided by the global batch's answer tokens (" answer\n") over the
    # world size, so that DDP's mean of the ranks' gradients is one process's gradient.
    divisor = sum(len(a) + 1 for _, a in problems) / runtime.world
    batch = problem_batch(problems[runtime.rank::runtime.world], runtime.device)
    loss = answer_loss(model, batch, runtime, divisor)
    optimizer_step(model, opt, params, loss, scaler, gamma, lr_max)
    loss = loss.detach()
    if runtime.world > 1:
        dist.all_reduce(loss)
        loss /= runtime.world  # the ranks' mean: the global batch's loss
    return loss

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

def pretrain(cfg, base_seed, runtime):
    """(TinyGPT trained on the generated corpus, its final loss): initialization and data from base_seed."""
    torch.manual_seed(base_seed)
    model = TinyGPT(cfg.model).to(runtime.device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    schedule, scaler = sorsa.cosine_schedule(opt, cfg.pretrain_steps), runtime.grad_scaler()
    for step, chunk in enumerate(pretraining_batches(cfg, base_seed)):
        loss = lm_loss(model, chunk.to(runtime.device), runtime)
        optimizer_step(model, opt, list(model.parameters()), loss, scaler)
        schedule.step()
        runtime.progress("pretrain", step + 1, cfg.pretrain_steps, loss.item())
    return model, loss.item()

def base_model(cfg, base_seed, runtime):
    """(the base model pretrained with base_seed, its cache file): from the cache when a file made with this
    configuration is there and intact, else pretrained now and cached atomically with a checksum (a truncated,
    corrupted or foreign cache is rebuilt, never trusted). Under torchrun rank 0 does it while the others wait."""
    key = json.dumps({"model": dataclasses.asdict(cfg.model), "steps": cfg.pretrain_steps, "lr": cfg.pretrain_lr,
                      "batch": cfg.pretrain_batch, "vocab": VOCAB, "amp": runtime.amp and str(runtime.amp_dtype),
                      "base_seed": base_seed, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    path = os.path.join(cfg.cache, f"tiny_gpt_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt")
    if not runtime.main:
        dist.barrier()  # until rank 0 has the cache ready
    try:
        model = TinyGPT(cfg.model)
        try:
            state, extra = si.load_checked(path)  # SHA-256 checked: torch.load misses flipped bytes in a tensor
            if extra.get("key") != key:
                raise ValueError("it was made with another configuration")
            model.load_state_dict(state)
            runtime.say(f"base model: cached {path} (pretraining loss {extra['loss']:.3f})")
        except (FileNotFoundError, ValueError, RuntimeError) as err:
            if not runtime.main:
                raise
            if os.path.exists(path):
                runtime.say(f"base model: cache {path} unusable ({err}); pretraining again")
            start = time.time()
            model, loss = pretrain(cfg, base_seed, runtime)
            os.makedirs(cfg.cache, exist_ok=True)
            si.save_checked({k: v.cpu() for k, v in model.state_dict().items()}, path, key=key, loss=loss)
            runtime.say(f"base model {base_seed}: pretrained in {time.time() - start:.0f} s, loss {loss:.3f}, "
                        f"cached as {path}")
    finally:
        if runtime.main and runtime.world > 1:
            dist.barrier()  # the cache is ready, or rank 0 failed (and the others' loads fail): none waits for ever
    return model.to(runtime.device), path

# ----------------------------------------------------------------------------- evaluation

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

@torch.no_grad()  # TinyGPT has no dropout: train and eval mode compute the same, so the mode is left alone
def evaluate(model, problems, runtime):
    """(eval loss on the answers, exact-match accuracy of greedy answers) on held-out problems.
    Under torchrun every rank evaluates the same problems (FSDP2 needs every rank's shards)."""
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

def weight_change(model, base, names):
    """Mean delta_sigma and delta_d (Eqs. 7-10) of the adapted layers against the base model."""
    layers = [sorsa.unwrap(model).get_submodule(n) for n in names]
    with torch.no_grad():  # the (m, n) weight each layer applies, whatever method built it (FSDP2's shards gathered)
        pairs = [(base.get_submodule(n).weight, layer.merge().weight if hasattr(layer, "merge") else whole(layer.weight))
                 for n, layer in zip(names, layers)]
        if not all(torch.isfinite(b).all() for _, b in pairs):  # diverged (too large a learning rate)
            return math.nan, math.nan
        return (statistics.mean(sorsa.delta_sigma(a, b) for a, b in pairs),
                statistics.mean(sorsa.delta_d(a, b) for a, b in pairs))

# ----------------------------------------------------------------------------- fine-tuning

def finetune(method, lr, base, data, cfg, seed, runtime, log_path=None, curve=True):
    """Fine-tune one method with one seed at learning rate lr on one base model (data: its EvalData);
    the reported numbers, and the model. log_path gets the test scores at 5 points of the run (curve)
    or at its end only."""
    torch.manual_seed(seed)  # LoRA's initialization
    if runtime.fsdp and METHODS[method].adapt is sorsa.apply_sorsa:
        model = sorsa_sharded(method, base, cfg, runtime)
    else:
        model = distribute(prepare(method, base, cfg), runtime)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule, scaler = sorsa.cosine_schedule(opt, cfg.steps), runtime.grad_scaler()
    gamma = cfg.gamma(method, lr)
    names = target_names(base, cfg.targets.split(","))
    losses, step_time = [], 0.0
    for step, problems in enumerate(training_batches(seed, cfg, exclude={p for p, _ in data.test + data.val})):
        start = time.perf_counter()
        loss = train_step(model, opt, params, problems, gamma, lr, runtime, scaler)
        schedule.step()
        step_time += time.perf_counter() - start
        losses.append(loss.item())
        runtime.progress(f"{method} seed {seed}", step + 1, cfg.steps, loss.item())
        if (curve and (step == 0 or (step + 1) % max(1, cfg.steps // 5) == 0)) or step + 1 == cfg.steps:
            eval_loss, acc = evaluate(model, data.test, runtime)
            d_sigma, d_d = weight_change(model, base, names)
            row = {"method": method, "lr": lr, "seed": seed, "step": step + 1, "train_loss": loss.item(),
                   "eval_loss": eval_loss, "accuracy": acc, "delta_sigma": d_sigma, "delta_d": d_d}
            append_jsonl(log_path, row, runtime)
    val_loss, val_acc = evaluate(model, data.val, runtime)
    forget_loss, forget_arithmetic = forgetting(model, data, runtime)
    tail = losses[-max(1, cfg.steps // 10):]  # eval_loss, acc, d_sigma, d_d below: the loop's last evaluation
    return {"lr": lr, "params": sum(p.numel() for p in params), "train_loss": statistics.mean(tail),
            "eval_loss": eval_loss, "accuracy": acc, "val_loss": val_loss, "val_accuracy": val_acc,
            "forget_loss": forget_loss, "forget_arithmetic": forget_arithmetic,
            "delta_sigma": d_sigma, "delta_d": d_d, "ms_per_step": 1e3 * step_time / cfg.steps}, model

@torch.no_grad()
def check_merge_and_adapter(model, base, test, cfg, runtime, base_path):
    """The SORSA model saved as an adapter and reloaded into a fresh base, and merged in place into plain
    nn.Linear layers, against the trained one: accuracy, logits, file sizes (printed, and returned)."""
    model = sorsa.unwrap(model)  # DDP's wrapper is for training; FSDP2 shards in place
    x = problem_batch(test, runtime.device)[0]
    logits = model(x).float()
    path = os.path.join(cfg.out, "sorsa_adapter.pt")
    si.save_adapter(model, path)  # FSDP2's shards gathered on every rank, rank 0 writes, every rank waits for it
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

# ----------------------------------------------------------------------------- the report

COLUMNS = [("train loss", "train_loss", "{:.3f}"), ("eval loss", "eval_loss", "{:.3f}"), ("accuracy", "accuracy", "{:.1%}"),
           ("val accuracy", "val_accuracy", "{:.1%}"), ("Δ held-out loss", "forget_loss", "{:+.3f}"),
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
        lines.append(f"| {method} | {runs[0]['params']:,} | " + " | ".join(cell(runs, k, f) for _, k, f in COLUMNS) + " |")
    return "\n".join(lines)

def plot(log_path, out):
    """curves.png: eval loss, delta_sigma and delta_d against the step, per method (seed 0)."""
    rows = [json.loads(line) for line in open(log_path)]
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("eval_loss", "delta_sigma", "delta_d")):
        for method in dict.fromkeys(r["method"] for r in rows):
            ax.plot(*zip(*[(r["step"], r[key]) for r in rows if r["method"] == method and r["seed"] == 0]), label=method)
        ax.set(xlabel="step", title=key, yscale="log" if key == "eval_loss" else "linear")
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "curves.png"), dpi=100)
    print(f"plot: {os.path.join(out, 'curves.png')}")

def append_jsonl(path, row, runtime):
    """Append one JSON line to a log (rank 0 only; none without a path)."""
    if path and runtime.main:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")

def prepare_base(cfg, base_seed, runtime):
    """(base model, its cache path, its EvalData, its (eval loss, accuracy) on the task), measured once."""
    base, path = base_model(cfg, base_seed, runtime)
    base.requires_grad_(False)
    test, val = held_out(cfg)
    heldout = heldout_text(cfg)
    data = EvalData(test, val, heldout, pretraining_skills(base, heldout, runtime))
    loss, acc = evaluate(base, test, runtime)
    runtime.say(f"base model {base_seed}: {data.base_skills[1]:.1%} of 200 arithmetic facts right, held-out "
                f"pretraining loss {data.base_skills[0]:.3f}; on the task: eval loss {loss:.3f}, accuracy {acc:.1%}")
    return base, path, data, (loss, acc)

def run(cfg):
    """The demo: every method on seeds 0 .. seeds-1 of one base model, the table and the plot, then SORSA's
    seed-0 model saved, reloaded and merged. Returns what it printed: base scores, results, checks."""
    start, runtime = time.time(), start_runtime(cfg)
    runtime.say(describe(cfg, runtime))
    base, base_path, data, base_scores = prepare_base(cfg, cfg.base_seed, runtime)
    os.makedirs(cfg.out, exist_ok=True)
    log_path = os.path.join(cfg.out, "log.jsonl")
    if runtime.main:
        open(log_path, "w").close()
    results, trained_sorsa, checks = {}, None, None
    for method in cfg.methods.split(","):
        for seed in range(cfg.seeds):
            result, model = finetune(method, METHODS[method].lr_scale * cfg.lr, base, data, cfg, seed, runtime, log_path)
            results.setdefault(method, []).append(result)
            if method == "sorsa" and seed == 0:
                trained_sorsa = model  # checked once the table is out
    runtime.say(f"\nbase model: eval loss {base_scores[0]:.3f}, accuracy {base_scores[1]:.1%}\n{results_table(results)}")
    if runtime.main:
        plot(log_path, cfg.out)
    if trained_sorsa is not None:  # none when SORSA was not among the methods
        checks = check_merge_and_adapter(trained_sorsa, base, data.test, cfg, runtime, base_path)
    runtime.say(f"log: {log_path}\ntotal time {time.time() - start:.0f} s")
    return {"base": base_scores, "runtime": runtime, "log": log_path, "checks": checks, "results": results}

def main(argv=None):
    run(parse_args(argv))
    if dist.is_initialized():
        si.end_distributed()  # not a plain destroy_process_group: its docstring says why

if __name__ == "__main__":
    main()
