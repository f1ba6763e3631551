"""train_tiny.py at tiny sizes, in-process: the demo's path, the cached base model's faults and the
bad-input handling; and theory/comparison.py's bookkeeping (sweep, resuming, paired intervals)."""

import copy
import dataclasses
import json
import math
import os
import random
import statistics

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import sorsa
import sorsa_integrations as si
import train_tiny
from theory import comparison
from theory.comparison import Comparison
from train_tiny import Config, GPTConfig, Runtime

CPU = Runtime(torch.device("cpu"))


def tiny_config(tmp_path, kind=Config, **overrides):
    """A run small enough for the default test suite (a few seconds per method on 2 cores)."""
    cfg = dict(steps=30, pretrain_steps=150, test_size=40, rank=4, batch_size=16,
               model=GPTConfig(n_layer=1, d_model=32), out=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    cfg.update(overrides)
    return kind(**cfg)


def test_every_method_lowers_the_eval_loss_and_sorsa_merges_and_reloads_exactly(tmp_path):
    report = train_tiny.run(tiny_config(tmp_path, steps=20, pretrain_steps=60, test_size=10))
    base_loss = report["base"][0]
    assert set(report["results"]) == set(train_tiny.METHODS)
    for method, (result,) in report["results"].items():
        assert result["lr"] == (3e-3 if method.startswith("sorsa") else 2e-3)  # the paper's 1.5x for SORSA
        assert result["eval_loss"] < base_loss, method
    rows, adapter_bytes, base_bytes = report["checks"]
    merged_acc, merged_diff = rows["merged"]
    reloaded_acc, reloaded_diff = rows["reloaded"]
    sorsa_acc = report["results"]["sorsa"][0]["accuracy"]
    assert merged_diff < 1e-4 and reloaded_diff < 1e-4  # float32 logits of size ~10
    assert merged_acc == reloaded_acc == sorsa_acc
    assert adapter_bytes < base_bytes
    assert os.path.getsize(report["log"]) > 0


def test_the_cuda_code_path_runs_on_the_cpu_under_bf16_autocast(tmp_path):
    """What --device cuda changes, bar the device: bf16 autocast in every forward of fine-tuning and
    evaluation (pretraining runs in float32), the regularizer turning it off; run here on every submission."""
    cfg = tiny_config(tmp_path, methods="sorsa,pissa", autocast="on", steps=10, pretrain_steps=50, test_size=10)
    report = train_tiny.run(cfg)
    assert report["runtime"].amp
    for method, (result,) in report["results"].items():
        assert result["eval_loss"] < report["base"][0], method
    rows = report["checks"][0]
    assert rows["reloaded"][1] < 0.1 and rows["merged"][1] < 0.1  # bf16 logits of size ~10: a few eps_bf16


def test_the_comparison_writes_under_its_own_directory_never_into_the_demos_log(tmp_path):
    """The demo truncates runs/tiny/log.jsonl at its start; the comparison's curves and sweep go elsewhere."""
    cfg = comparison.parse_args(["--lrs", "1e-3"])
    assert cfg.out == "runs/comparison" and train_tiny.parse_args([]).out == "runs/tiny"
    elsewhere = str(tmp_path / "elsewhere")
    assert comparison.parse_args(["--lrs", "1e-3", "--out", elsewhere]).out == elsewhere


def test_every_adapted_layer_merges_into_the_plain_linear_it_computes():
    """SORSA's, PiSSA's and LoRA's layers all give their effective weight the same way, merge(): a plain
    frozen nn.Linear with the layer's output (float64, after a step that moved every factor), which the
    analysis metrics read."""
    torch.manual_seed(0)
    base = train_tiny.TinyGPT(GPTConfig(n_layer=1, n_head=2, d_model=16)).double().requires_grad_(False)
    x = torch.randn(5, 16, dtype=torch.float64)
    for method in ("sorsa", "pissa", "lora"):
        model = train_tiny.prepare(method, base, Config(rank=3))
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            for p in params:
                p.add_(0.1 * torch.randn_like(p))
        layer = model.blocks[0].attn.q_proj
        merged = layer.merge()
        assert type(merged) is torch.nn.Linear and not merged.weight.requires_grad
        torch.testing.assert_close(merged(x), layer(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(merged.weight, base.blocks[0].attn.q_proj.weight), method  # it moved


def test_under_fp16_and_a_grad_scaler_the_regularizers_gradient_reaches_the_optimizer_unscaled(monkeypatch):
    """The T4 path (fp16 autocast, GradScaler; here the CPU's): finetune's step unscales the task gradient
    before the clip and adds (gamma / lr) grad L_reg after, so what the optimizer steps with differs between
    SORSA and SORSA at gamma = 0 by exactly that gradient, not by it divided by the scale (65,536): float32
    tolerance. The factors are moved off orthonormality, where Eq. 4 has a gradient."""
    runtime = Runtime(torch.device("cpu"), amp=True, amp_dtype=torch.float16)
    assert runtime.grad_scaler().get_scale() == 2.0 ** 16
    torch.manual_seed(0)
    base = train_tiny.TinyGPT(GPTConfig(n_layer=1, n_head=2, d_model=16)).requires_grad_(False)
    cfg = Config(steps=1, batch_size=8, rank=2, test_size=2, curve=False, model=base.cfg)
    data = train_tiny.EvalData(train_tiny.test_problems(cfg), train_tiny.heldout_text(cfg, 4), (0.0, 0.0), set())
    real_prepare, seen = train_tiny.prepare, {}

    def off_orthonormality(method, base, cfg):
        model = real_prepare(method, base, cfg)
        with torch.no_grad():
            for i, (_, mod) in enumerate(sorsa.sorsa_modules(model)):
                mod.U_p.add_(0.1 * torch.randn(mod.U_p.shape, generator=torch.Generator().manual_seed(i)))
        return model
    monkeypatch.setattr(train_tiny, "prepare", off_orthonormality)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda opt, *a, **k: seen.setdefault(
        method, [p.grad.clone() for p in opt.param_groups[0]["params"]]))
    lr = 1e-3
    for method in ("sorsa", "sorsa_g0"):
        train_tiny.finetune(method, lr, base, data, cfg, 0, runtime)
    model = off_orthonormality("sorsa", base, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    reg = torch.autograd.grad(cfg.gamma_ratio * sorsa.orthonormal_regularizer(model), params, allow_unused=True,
                              materialize_grads=True)
    for with_reg, without, r in zip(seen["sorsa"], seen["sorsa_g0"], reg):
        assert torch.allclose(with_reg - without, r, rtol=1e-5, atol=1e-6 * (1 + r.abs().max().item()))
    assert max(r.abs().max().item() for r in reg) > 1e-3  # large enough to tell from its 65,536th part


def test_the_demo_says_which_autocast_dtype_it_chose():
    cpu_fp16 = train_tiny.start_runtime(Config(device="cpu", autocast="fp16"))
    assert (cpu_fp16.amp, cpu_fp16.amp_dtype) == (True, torch.float16)
    assert not train_tiny.start_runtime(Config(device="cpu")).amp  # auto: on CUDA only
    assert train_tiny.start_runtime(Config(device="cpu", autocast="on")).amp_dtype == torch.bfloat16
    assert cpu_fp16.grad_scaler().is_enabled() and not CPU.grad_scaler().is_enabled()  # a GradScaler for fp16 only


def test_base_model_is_cached_and_damaged_or_foreign_caches_are_rebuilt(tmp_path, capsys):
    """A cached base model is loaded (no pretraining); one that fails its checksum, is cut short, is not a
    checkpoint or was made with another configuration is simply pretrained again, to the same weights."""
    cfg = tiny_config(tmp_path, pretrain_steps=20)
    pretrained = f"pretraining {cfg.pretrain_steps} steps"
    first, path = train_tiny.base_model(cfg, 0, CPU)
    assert pretrained in capsys.readouterr().out
    again, same_path = train_tiny.base_model(cfg, 0, CPU)
    assert same_path == path and pretrained not in capsys.readouterr().out
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    good = open(path, "rb").read()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF  # inside a tensor: torch.load alone would not notice
    state, extra = si.load_checked(path)
    for damage in (good[: len(good) // 2], bytes(flipped), b"not a checkpoint", None):
        if damage is None:
            si.save_checked(state, path, **{**extra, "key": "another configuration"})
        else:
            with open(path, "wb") as f:
                f.write(damage)
        rebuilt, _ = train_tiny.base_model(cfg, 0, CPU)
        assert pretrained in capsys.readouterr().out
        for a, b in zip(first.state_dict().values(), rebuilt.state_dict().values()):
            assert torch.equal(a.cpu(), b.cpu())  # pretraining is deterministic
        assert open(path, "rb").read() != damage and si.load_checked(path)[1]["key"] != "another configuration"


def test_base_seeds_pretrain_different_base_models_cached_apart(tmp_path):
    cfg = tiny_config(tmp_path, pretrain_steps=20)
    (a, path_a), (b, path_b) = (train_tiny.base_model(cfg, seed, CPU) for seed in (0, 1))
    assert path_a != path_b and not torch.equal(a.wte.weight, b.wte.weight)
    again, path = train_tiny.base_model(cfg, 1, CPU)  # from the cache
    assert path == path_b and all(torch.equal(x, y) for x, y in zip(b.state_dict().values(), again.state_dict().values()))


def test_the_task_and_corpus_are_the_ones_the_documented_results_were_measured_on():
    """README's and docs/'s tables hold for these exact problems and lines: a refactor of the data code that
    draws in another order would silently change every number. The first items by eye, the sets by hash."""
    import hashlib
    test = train_tiny.test_problems(Config())
    val = comparison.validation_problems(Comparison(), test)
    assert test[0] == ("ann has 6 shells and gets 10 more. how many?", "6+10=16")
    assert val[1] == ("hal has 8 bags of 4 cards. how many?", "8*4=32")
    assert hashlib.sha256(repr((test, val)).encode()).hexdigest()[:16] == "fcf8fbb716128804"
    assert next(train_tiny.training_batches(0, Config(), set()))[0] == ("gus has 10 cards and gives away 1. how many?",
                                                                      "10-1=9")
    assert train_tiny.pretrain_line(random.Random(0)) == "6-0=6"
    assert [train_tiny.fact(random.Random(i)) for i in range(2)] == [(6, "-", 0, 6), (9, "+", 1, 10)]


# ----------------------------------------------------------------------------- forgetting


def test_an_unchanged_model_forgets_nothing_and_measuring_changes_no_model(tmp_path):
    """Forgetting is measured against the base model's own numbers: a copy of it gives exactly 0;
    the measurement trains nothing and leaves every tensor and the train/eval mode as they were;
    a model whose weights moved shows it."""
    cfg = tiny_config(tmp_path, pretrain_steps=40)
    base, _ = train_tiny.base_model(cfg, 0, CPU)
    heldout = train_tiny.heldout_text(cfg, 32)
    data = train_tiny.EvalData([], heldout, train_tiny.pretraining_skills(base, heldout, CPU), set())
    for training in (True, False):
        model = copy.deepcopy(base).train(training)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert train_tiny.forgetting(model, data, CPU) == (0.0, 0.0)
        assert model.training == training and all(p.grad is None for p in model.parameters())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.blocks[0].up_proj.weight.mul_(3)
    assert train_tiny.forgetting(model, data, CPU)[0] != 0


@pytest.mark.parametrize("base_seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_held_out_pretraining_text_is_disjoint_from_what_pretraining_drew(base_seed):
    """Windows of the pretraining distribution that pretraining never drew, for the default settings and
    base seeds 0-2 (the README's; 1 and 2 marked slow, 4 s each): forgetting is measured on text never trained on."""
    cfg = Config()
    heldout = {tuple(row) for row in train_tiny.heldout_text(cfg).tolist()}
    assert len(heldout) == 256
    drawn = {tuple(row) for batch in train_tiny.pretraining_batches(cfg, base_seed) for row in batch.tolist()}
    assert len(drawn) > 39000 and not heldout & drawn


# ----------------------------------------------------------------------------- the paper's recipe


def test_the_papers_recipe_is_the_default(tmp_path, monkeypatch):
    """App. B and Table 3 fix AdamW with weight decay 0, a 3% warm-up then cosine, clipping at 1.0:
    cosine_schedule warms up over 3% unless told otherwise, and train_tiny's runs use all of it."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = sorsa.cosine_schedule(opt, 100)  # 3 warm-up steps of 100
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0, (1 + math.cos(math.pi / 97)) / 2])
    adamw, clips = [], []
    real_adamw, real_clip = torch.optim.AdamW, torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.optim, "AdamW", lambda params, **kw: adamw.append(kw) or real_adamw(params, **kw))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_",
                        lambda params, max_norm, **kw: clips.append(max_norm) or real_clip(params, max_norm, **kw))
    cfg = tiny_config(tmp_path, pretrain_steps=5, steps=2, methods="sorsa,pissa", test_size=4)
    train_tiny.run(cfg)
    assert len(adamw) == 3 and all(kw["weight_decay"] == 0 for kw in adamw)  # pretraining, then each method
    assert len(clips) == 5 + 2 * 2 and set(clips) == {1.0}  # every step of each


# ----------------------------------------------------------------------------- theory/comparison.py


def fake_base(cfg, base_seed, runtime):
    """train_tiny.prepare_base without pretraining: a name for the base model and an empty EvalData."""
    return f"base {base_seed}", "path", train_tiny.EvalData([], None, (1.0, 1.0), set()), (1.0, 0.0)


def fake_finetune(calls, score):
    """A finetune that records what it was given and returns at once a result whose accuracy is
    score(method, lr), and for a model, (method, lr), which fake_evaluate scores."""
    def finetune(method, lr, base, data, cfg, seed, runtime, log_path=None):
        calls.append((method, lr, cfg.gamma(method, lr), seed, base))
        acc = score(method, lr)
        return {"params": 1, "train_loss": 1.0, "eval_loss": 1.0 - acc, "accuracy": acc, "forget_loss": 0.1 + seed,
                "forget_arithmetic": -0.01, "delta_sigma": 0.0, "delta_d": 0.0, "ms_per_step": 1.0}, (method, lr)
    return finetune


def fake_sweep(monkeypatch, calls, score=None):
    """The comparison on fakes: by default a learning rate that "helps" every method."""
    score = score or (lambda method, lr: {"sorsa": 0.5, "pissa": 0.4}.get(method, 0.1) + lr)
    monkeypatch.setattr(train_tiny, "prepare_base", fake_base)
    monkeypatch.setattr(train_tiny, "finetune", fake_finetune(calls, score))
    monkeypatch.setattr(train_tiny, "evaluate", lambda model, problems, runtime: (1.0 - score(*model), score(*model)))
    monkeypatch.setattr(comparison, "hessian_lambda_max", lambda *a, **k: 2.0)


def test_sweep_gives_every_method_each_listed_lr_with_gamma_over_lr_held_and_resumes(tmp_path, monkeypatch):
    calls = []
    fake_sweep(monkeypatch, calls)
    cfg = tiny_config(tmp_path, Comparison, methods="sorsa,sorsa_g0,pissa", lrs="1e-3,4e-3", seeds=2, gamma_ratio=0.25)
    report = comparison.run(cfg)
    assert sorted(calls) == sorted((m, lr, g, s, "base 0") for m in ("sorsa", "sorsa_g0", "pissa") for lr in (1e-3, 4e-3)
                                   for g in [0.25 * lr if m == "sorsa" else 0.0] for s in (0, 1))
    assert set(report["results"]["sorsa"]) == {1e-3, 4e-3}  # the listed lr, not 1.5x
    # Interrupted half-way: drop the last 4 finished runs and cut the last kept line short.
    path = tmp_path / "out" / "sweep.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-4]) + "\n" + lines[-4][:20])
    calls.clear()
    again = comparison.run(cfg)
    assert calls == [(m, 4e-3, 0.0, s, "base 0") for m in ("sorsa_g0", "pissa") for s in (0, 1)]
    assert again["results"] == report["results"]
    calls.clear()
    comparison.run(dataclasses.replace(cfg, rank=2))  # another experiment: nothing is reused
    assert len(calls) == 12


def test_sweep_refines_by_sqrt_2_then_runs_new_seeds_at_the_chosen_rate_on_every_base(tmp_path, monkeypatch):
    """Validation accuracy peaks at lr 5e-3: of the grid 1e-3, 4e-3, 1.6e-2 the best is 4e-3, its
    sqrt 2 neighbours are added and 5.66e-3 wins; then seeds 2-4 (never used to choose) on bases 0 and 1."""
    calls = []
    fake_sweep(monkeypatch, calls, score=lambda method, lr: 1 - abs(math.log(lr / 5e-3)))
    cfg = tiny_config(tmp_path, Comparison, methods="sorsa,lora", lrs="1e-3,4e-3,1.6e-2", seeds=2, refine=True,
                      final_seeds=3, base_seeds="0,1")
    report = comparison.run(cfg)
    up, down = 4e-3 * math.sqrt(2), 4e-3 / math.sqrt(2)
    for method in ("sorsa", "lora"):
        assert sorted(report["results"][method]) == sorted([1e-3, 4e-3, 1.6e-2, down, up])
        assert {(lr, s, b) for m, lr, _, s, b in calls if m == method} == \
            {(lr, s, "base 0") for lr in (1e-3, 4e-3, 1.6e-2, down, up) for s in (0, 1)} | \
            {(up, s, b) for s in (2, 3, 4) for b in ("base 0", "base 1")}
    assert set(report["final"]) == {0, 1} and set(report["final"][1]["lora"]) == {2, 3, 4}
    table = comparison.sweep_table(report["results"], report["lambdas"])
    assert f"| sorsa | **{up:.3g}** | 2 |" in table and "| sorsa | 0.004 | 2 |" in table
    assert "| lora | 0.00566 | 2 | 1 |" in table  # lambda_max 2, so 2 / lambda_max = 1
    calls.clear()
    comparison.run(cfg)  # everything is in the log
    assert calls == []


def test_the_comparison_pairs_runs_by_seed_and_states_only_what_the_interval_decides():
    """Seeds move both methods together (a shared data order): paired, SORSA's +0.1 on every seed is
    established although the spread over seeds (0.3) hides it unpaired. Against LoRA the differences
    seed by seed are 0.05, 0.4, 0.05, 0.05, 0.05: mean 0.12, interval [-7.4%, +31.4%] (t_4 = 2.776),
    not established; pairing by rank instead of seed would give [+1.6%, +22.4%] and a verdict."""
    def runs(values):
        return {seed: {"accuracy": v, "forget_loss": v / 10, "forget_arithmetic": 0.0} for seed, v in enumerate(values)}
    spread = [0.1, 0.5, 0.2, 0.8, 0.4]
    sorsa_acc = [v + 0.1 for v in spread]
    final = {0: {"sorsa": runs(sorsa_acc), "pissa": runs(spread),
                 "lora": runs([v - d for v, d in zip(sorsa_acc, [0.05, 0.4, 0.05, 0.05, 0.05])])}}
    table = comparison.comparison_tables(final)
    assert "| base 0 | pissa | 5 | +10.0% [+10.0%, +10.0%], sorsa higher |" in table
    assert "| base 0 | lora | 5 | +12.0% [-7.4%, +31.4%], not established |" in table
    _, _, (low, high) = comparison.interval(sorsa_acc)
    assert low < statistics.mean(spread) < high  # unpaired, the +0.1 is inside the interval


def test_t_quantile_and_interval_match_the_tables():
    for df, t in [(1, 12.706), (2, 4.303), (9, 2.262), (29, 2.045)]:
        assert abs(comparison.t_975(df) - t) < 1e-3
    mean, std, (low, high) = comparison.interval([1.0, 2.0, 3.0])
    assert (mean, std) == (2.0, 1.0) and math.isclose(high - mean, 4.3027 / math.sqrt(3), rel_tol=1e-4)
    assert comparison.verdict(*comparison.interval([0.1, 0.2, 0.15])[2]) == "higher"
    assert comparison.verdict(*comparison.interval([-0.1, 0.2])[2]) == "not established"
    assert comparison.verdict(*comparison.interval([-0.1, -0.2, -0.15])[2]) == "lower"


def test_run_key_changes_with_every_setting_that_changes_an_experiment_and_only_with_those():
    """A resumed sweep reuses a logged run only when its key matches: a key blind to, say, the
    step count would silently mix 100-step and 300-step results in one table."""
    cfg = Comparison()
    same = {"methods": "lora", "lrs": "1e-3", "seeds": 3, "out": "elsewhere", "device": "cpu", "cache": "other",
            "base_seeds": "1,2", "base_seed": 1, "refine": True, "final_seeds": 10,  # each run logs its base
            "curve": True}  # evaluations during a run change nothing in it
    assert comparison.run_key(dataclasses.replace(cfg, **same)) == comparison.run_key(cfg)
    changed = {"targets": "fc", "rank": 4, "steps": 7, "lr": 1e-2, "gamma_ratio": 0.5, "batch_size": 8,
               "test_size": 10, "val_size": 10, "pretrain_steps": 9, "pretrain_batch": 4, "pretrain_lr": 1e-4,
               "autocast": "on", "model": dataclasses.replace(cfg.model, n_layer=1)}
    assert set(changed) | set(same) == {f.name for f in dataclasses.fields(Comparison)}
    for name, value in changed.items():
        assert comparison.run_key(dataclasses.replace(cfg, **{name: value})) != comparison.run_key(cfg), name


def test_validation_split_is_disjoint_from_the_test_set_and_from_training():
    cfg = Comparison(steps=50, test_size=200, val_size=200)
    test = train_tiny.test_problems(cfg)
    val = comparison.validation_problems(cfg, test)
    assert len(val) == 200 and not {p for p, _ in test} & {p for p, _ in val}
    exclude = {p for p, _ in test + val}
    for seed in (0, 1):
        seen = {p for batch in train_tiny.training_batches(seed, cfg, exclude) for p, _ in batch}
        assert not seen & exclude


def test_best_lr_is_chosen_on_validation_not_on_the_test_set():
    def run(val, test):
        return [{"val_accuracy": val, "val_loss": 1 - val, "accuracy": test}]
    by_lr = {1e-3: run(0.9, 0.5), 2e-3: run(0.6, 0.99)}
    assert comparison.best_lr(by_lr) == 1e-3
    tied = {1e-3: [{"val_accuracy": 0.9, "val_loss": 0.3}], 2e-3: [{"val_accuracy": 0.9, "val_loss": 0.2}]}
    assert comparison.best_lr(tied) == 2e-3


def test_hessian_power_iteration_finds_the_largest_eigenvalue_of_the_dense_hessian():
    cfg = Config(rank=1, targets="q_proj,down_proj", model=GPTConfig(n_layer=1, n_head=1, d_model=4))
    torch.manual_seed(0)
    base = train_tiny.TinyGPT(cfg.model).requires_grad_(False)
    problems = [train_tiny.word_problem(random.Random(i)) for i in range(4)]
    model = train_tiny.prepare("pissa", base, cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [model.get_parameter(n).shape for n in names]
    batch = train_tiny.problem_batch(problems, "cpu")

    def loss_of(flat):  # the task loss as a function of the trainable parameters, flattened
        chunks = flat.split([s.numel() for s in shapes])
        state = {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}
        return train_tiny.answer_loss(lambda x: torch.func.functional_call(model, state, (x,)), batch, CPU)

    flat = torch.cat([model.get_parameter(n).detach().flatten() for n in names])  # 28 parameters
    with sdpa_kernel(SDPBackend.MATH):
        eigenvalues = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of, flat))
    assert eigenvalues[0] < 0 and abs(eigenvalues[0]) > eigenvalues[-1]  # the case that needs the shifted run
    lam = comparison.hessian_lambda_max("pissa", base, problems, cfg, CPU, iters=300)
    assert abs(lam - eigenvalues[-1].item()) <= 1e-3 * abs(eigenvalues[-1].item())


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv, words", [
    (["--rank", "97"], "--rank 97 is outside [1, 96]"),
    (["--rank", "0"], "--rank 0 is outside"),
    (["--methods", "sorsa,dora"], "unknown method(s) dora"),
    (["--targets", "lm_head"], "unknown target(s) lm_head"),
    (["--steps", "0"], "--steps, --seeds, --test_size, --pretrain_steps and --batch_size must be >= 1"),
])
def test_bad_arguments_exit_with_status_2_and_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.parse_args(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_quick_settings_yield_to_explicit_flags():
    cfg = train_tiny.parse_args(["--quick", "--steps", "7"])
    assert cfg.steps == 7 and cfg.model.d_model == 64 and cfg.pretrain_steps == 300


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2 and "sees no CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["out", "cache"])
def test_an_unwritable_folder_exits_with_status_2_naming_its_flag(tmp_path, capsys, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.parse_args([f"--{flag}", str(blocker / flag)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "cannot write to" in err and f"pass a writable --{flag}" in err


def test_sweep_log_lines_are_json_with_the_run_key_and_the_base(tmp_path, monkeypatch):
    fake_sweep(monkeypatch, [])
    cfg = tiny_config(tmp_path, Comparison, methods="lora", lrs="1e-3", base_seeds="3")
    comparison.run(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "out" / "sweep.jsonl")]
    assert [(r["method"], r["lr"], r["seed"], r["base_seed"], r["key"]) for r in rows] == \
        [("lora", 1e-3, 0, 3, comparison.run_key(cfg))]


@pytest.mark.parametrize("argv, words", [
    (["--lrs", "1e-3,fast"], "--lrs '1e-3,fast' must be positive numbers"),
    (["--lrs", "1e-3,-1"], "must be positive numbers"),
    (["--lrs", "1e-3", "--base_seeds", "0,x"], "--base_seeds '0,x' must be integers >= 0"),
    (["--lrs", "1e-3", "--final_seeds", "-1"], "--final_seeds must be >= 0"),
    (["--lrs", "1e-3", "--rank", "97"], "--rank 97 is outside [1, 96]"),  # the demo's checks apply too
    (["--steps", "5"], "the following arguments are required: --lrs"),
])
def test_bad_comparison_arguments_exit_with_status_2_and_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        comparison.parse_args(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err
