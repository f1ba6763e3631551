"""SORSA under DDP and FSDP2: 2 (and, marked slow, 3) gloo processes started by torchrun, against one process.

The tests read what one launch of this file as torchrun's script (the worker at the bottom) wrote: one
launch of 2 processes runs every 2-process case, to pay torch's start-up once. torchrun --standalone
picks a free port; a child that fails or hangs fails the test with its output (tracebacks
included) after a timeout, never hangs CI. The worker writes what it measured; the test
asserts. Tolerances: float32 reductions in another order, a few eps_32 of the values.
"""

import copy
import json
import os
import math
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from torch.distributed.tensor import Shard

import sorsa
import sorsa_integrations as si

STEPS, LR, GAMMA = 3, 0.05, 0.05  # SGD: the factors move linearly in the gradients, so any error shows
TIMEOUT = 180  # seconds for one torchrun launch; normal runs take 10-40 s
CASES = {2: ["ddp-float32", "fsdp-float32", "fsdp-bfloat16"], 3: ["fsdp-float32"]}  # the cases one launch runs


def torchrun(*args, nproc=2):
    """Run `torchrun --standalone --nproc_per_node nproc *args` with a timeout; its output. The last
    argument must be unique to this launch: it finds the workers to kill if torchrun cannot."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return run_to_end(cmd, args[-1], {"OMP_NUM_THREADS": "1"})


def run_to_end(cmd, marker, env, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=TIMEOUT):
    """Run cmd (with env added to this process's environment) within timeout seconds; its output, or a test
    failure that shows it. marker: an argument of the command that finds its processes to kill if it hangs."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a stray worker cannot block the read
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            stop(proc, marker)
            log.seek(0)
            pytest.fail(f"{' '.join(cmd)} hung for {timeout} s; its output:\n{log.read()}")
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{out}"
    return out


def stop(proc, marker):
    """Stop torchrun and its workers, which run in sessions of their own: SIGTERM makes torchrun
    stop them; whatever still runs with `marker` on its command line is then killed."""
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except OSError:  # gone already
            pass


WIDTHS = dict(d=18, h=25)  # 2 and 3 ranks shard 18 evenly (Vt_p by columns), 25 not (13 + 12, 9 + 9 + 7 rows; Vt_p
# kept on rows); at rank 4 the randomized SVD's sketch (14 columns) is narrower than every layer


def model_and_batch(dtype):
    """A small adapted model (widths WIDTHS) and a global batch of 12. The factors are moved off
    orthonormality so the regularizer has a gradient."""
    from test_sorsa import rand, toy_model
    base = toy_model(0, **WIDTHS, dtype=dtype)
    model = copy.deepcopy(base)
    sorsa.apply_sorsa(model, 4, ["q_proj", "v_proj", "up", "down"])
    with torch.no_grad():
        for i, (_, mod) in enumerate(sorsa.sorsa_modules(model)):
            mod.U_p.add_(0.1 * rand(*mod.U_p.shape, seed=i, dtype=torch.float32))
            mod.Vt_p.add_(0.1 * rand(*mod.Vt_p.shape, seed=100 + i, dtype=torch.float32))
    x = rand(12, WIDTHS["d"], seed=7, dtype=dtype)  # a global batch of 12: an equal share on 2 or 3 ranks
    return base, model, x, torch.sin(3 * x)


def regularized_backward(model, x, target, way):
    """One backward of Eq. 6 in either way: the regularizer in the task's backward, or its own after it."""
    task = (model(x) - target).float().square().mean()
    if way == "sorsa_loss":
        sorsa.sorsa_loss(task, model, GAMMA, LR).backward()
    else:
        task.backward()
        sorsa.add_regularizer_grad(model, GAMMA, LR)


def train(model, x, target, engine, steps=STEPS):
    """SGD on Eq. 6 with a mean-squared task loss; an optimizer over model.parameters(), as users
    write it. DDP: sorsa_loss; FSDP2: the authors' order, the regularizer's own backward after the
    task's (add_regularizer_grad; test_fsdp2_gradients_... checks both ways under FSDP2)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        regularized_backward(model, x, target, "sorsa_loss" if engine == "ddp" else "add_regularizer_grad")
        opt.step()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launched(engine, dtype, nproc): the folder of that case, from the one launch of nproc processes that
    runs every case of CASES[nproc] (launched the first time a test asks for it)."""
    folders, failed = {}, {}

    def launch(engine, dtype, nproc=2):
        if nproc in failed:  # every test of a failed launch shows its output, not a missing file
            pytest.fail(failed[nproc], pytrace=False)
        if nproc not in folders:
            folder = tmp_path_factory.mktemp(f"launch-{nproc}")
            try:
                torchrun(__file__, *CASES[nproc], str(folder), nproc=nproc)  # the folder last: unique
            except (AssertionError, pytest.fail.Exception) as err:
                failed[nproc] = f"the launch of {nproc} processes failed:\n{err}"
                raise
            folders[nproc] = folder
        return folders[nproc] / f"{engine}-{dtype}"
    return launch


SLOW = pytest.mark.slow  # the 3-process launch: 3 processes on 2 cores, 35-45 s


@pytest.mark.parametrize("engine, dtype, nproc", [("ddp", "float32", 2), ("fsdp", "float32", 2), ("fsdp", "bfloat16", 2),
                                                  pytest.param("fsdp", "float32", 3, marks=SLOW)])
def test_processes_train_as_one_process_does_on_the_same_global_batch(launched, engine, dtype, nproc):
    """DDP and FSDP2 against one process, with 2 ranks and (slow) 3, where fsdp_shard_placement keeps the
    width-25 Vt_p on rows (FSDP2 cannot shard 25 columns 2 or 3 ways) and its Gram is gathered."""
    tmp_path = launched(engine, dtype, nproc)
    report = json.loads((tmp_path / "report.json").read_text())
    base, single, x, target = model_and_batch(getattr(torch, dtype))
    reg0 = sorsa.orthonormal_regularizer(single).item()
    train(single, x, target, engine)
    expected = sorsa.adapter_state_dict(single)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    assert all(r.keys() == expected.keys() for r in ranks)
    assert all(torch.equal(ranks[0][k], other[k]) for other in ranks[1:] for k in expected)  # one model on all ranks
    # bf16 base: the task gradient passes through bf16 activations computed in other batch splits.
    tol = 1e-5 if dtype == "float32" else 2e-2
    for k, v in expected.items():
        assert torch.allclose(ranks[0][k], v, rtol=0, atol=tol * (1 + v.abs().max().item())), k
    assert abs(report["regularizer_before"] - reg0) <= 1e-6 * (1 + reg0)  # the sharded Gram sum is the whole one
    assert abs(report["regularizer_after"] - sorsa.orthonormal_regularizer(single).item()) <= tol
    assert report["broadcast_bytes"] == 0  # DDP broadcasts buffers every step; the layer has none
    names = report["regularizer_collectives"]
    if engine == "fsdp":  # rank 0 holds its share of every frozen residual, in the weight's dtype
        shares = [math.ceil(mod.W_r.shape[0] / nproc) / mod.W_r.shape[0] for _, mod in sorsa.sorsa_modules(single)]
        assert report["W_r_local_fraction"] == pytest.approx(shares) and set(report["W_r_dtypes"]) == {str(getattr(torch, dtype))}
        widths = [mod.in_features for _, mod in sorsa.sorsa_modules(single)]
        assert report["Vt_p_placements"] == ["S(1)" if n % nproc == 0 else "S(0)" for n in widths]
        # The Gram matrices of factors sharded by rows are summed, one all-reduce per factor shape (factors
        # stacked with their like placements); only a Vt_p held by rows is gathered.
        shapes = {tuple(f.shape) for _, mod in sorsa.sorsa_modules(single) for f in (mod.U_p, mod.Vt_p.mT)}
        assert names.count("all_reduce") == len(shapes)
        assert ("all_gather_into_tensor" in names) == any(n % nproc for n in widths)
    else:
        assert names == []  # DDP: every rank holds whole factors
    # Saved through the wrapper, complete on every rank when the save returns, even while rank 0 writes
    # slowly; a write that fails on rank 0 raises on rank 1 too.
    seen = json.loads((tmp_path / "rank1_loaded.json").read_text())
    assert (seen["adapter"], seen["lora_files"]) == (True, 2)
    assert seen["failure"].startswith("RuntimeError: rank 0 could not write") and "FileNotFoundError" in seen["failure"]
    fresh = copy.deepcopy(base)
    si.load_adapter(fresh, tmp_path / "adapter.pt")
    with torch.no_grad():
        assert torch.allclose(fresh(x).float(), single(x).float(), atol=10 * tol)
    lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") and ".module." not in k for k in lora)
    names = [name for name, _ in sorsa.sorsa_modules(single)]
    sorsa.merge_sorsa(single)
    assert report["merged_names"] == names
    with torch.no_grad():
        assert torch.allclose(torch.tensor(report["merged_output"]), single(x).float(), atol=10 * tol)


GRADIENT_CASES = [(placement, way) for placement in ("fully_shard", "fsdp_shard_placement")
                  for way in ("sorsa_loss", "add_regularizer_grad")]


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=SLOW)])
@pytest.mark.parametrize("placement, way", GRADIENT_CASES)
def test_fsdp2_gradients_of_both_ways_equal_one_process_wherever_Vt_p_lies(launched, nproc, placement, way):
    """The factors' gradients after one backward of Eq. 6 (sorsa_loss, or add_regularizer_grad after the task's),
    under plain fully_shard (every Vt_p held by rows: 2 + 2 of r = 4 on 2 ranks, 2 + 2 + 0 on 3) and under
    fsdp_shard_placement (Vt_p of width 18 by columns, of width 25, which neither 2 nor 3 divides, by rows), with
    the factors off orthonormality, where Eq. 4's gradient is smooth. Each gradient arrives in its factor's own
    placement (a Vt_p held by rows got a Partial one, which FSDP2's reduce-scatter could not add to: issue 45),
    and gathered equals one process's to float32 sums in another order (6e-7 of the largest entry seen)."""
    got = torch.load(launched("fsdp", "float32", nproc) / "gradients" / f"{placement}-{way}.pt", weights_only=True)
    _, single, x, target = model_and_batch(torch.float32)
    regularized_backward(single, x, target, way)
    layers = sorsa.sorsa_modules(single)
    assert got.pop("misplaced") == []
    assert set(got) == {f"{name}.{k}" for name, _ in layers for k in ("U_p", "S_p", "Vt_p")}
    for name, mod in layers:
        for k in ("U_p", "S_p", "Vt_p"):
            want = getattr(mod, k).grad
            assert torch.allclose(got[f"{name}.{k}"], want, rtol=0, atol=1e-5 * want.abs().max().item()), (name, k)


def test_fsdp_placement_shards_columns_only_where_the_world_size_divides_them():
    """The placement function alone, for world sizes that do and do not divide Llama's widths."""
    model = nn.ModuleDict({"q_proj": nn.Linear(4096, 16), "down_proj": nn.Linear(11008, 16)})
    sorsa.apply_sorsa(model, 4)
    q, down = model["q_proj"], model["down_proj"]
    for world, q_cols, down_cols in [(2, True, True), (3, False, False), (4, True, True), (6, False, False), (8, True, True)]:
        place = si.fsdp_shard_placement(model, world_size=world)
        for layer, columns in ((q, q_cols), (down, down_cols)):
            assert (place(layer.Vt_p) == Shard(1)) == columns and (place(layer.Vt_p0) == Shard(1)) == columns
            assert place(layer.U_p) is None and place(layer.W_r) is None  # rows, FSDP2's default


def tiny_gpt_with_sorsa():
    """A one-block TinyGPT with random weights, every block linear adapted at rank 2."""
    import train_tiny
    torch.manual_seed(0)
    model = train_tiny.TinyGPT(train_tiny.GPTConfig(n_layer=1, n_head=2, d_model=16))
    sorsa.apply_sorsa(model, 2, train_tiny.BLOCK_LINEARS)
    with torch.no_grad():  # off orthonormality, where Eq. 4's gradient is smooth (at it, its direction
        for _, mod in sorsa.sorsa_modules(model):  # follows the SVD's rounding, which varies with threads)
            mod.U_p.add_(0.1 * torch.randn(mod.U_p.shape))
            mod.Vt_p.add_(0.1 * torch.randn(mod.Vt_p.shape))
    return model


def tiny_steps(model, rt, steps=2):
    """SGD steps on train_tiny.batch_loss (this rank's share of each global batch of 8 problems) with Eq. 6 added
    after it, as train_tiny.finetune adds it: the global batches' losses, the ranks' shares summed."""
    import torch.distributed as dist

    import train_tiny
    params = [p for p in model.parameters() if p.requires_grad]
    opt, losses = torch.optim.SGD(params, lr=LR), []
    for problems in train_tiny.training_batches(0, train_tiny.Config(steps=steps, batch_size=8), set()):
        loss = train_tiny.batch_loss(model, problems, rt)
        opt.zero_grad()
        loss.backward()
        sorsa.add_regularizer_grad(model, GAMMA, LR)
        opt.step()
        loss = loss.detach()
        if rt.world > 1:
            dist.all_reduce(loss)
        losses.append(loss.item() / rt.world)
    return losses


def test_train_tiny_step_on_rank_shares_is_the_single_process_step(launched):
    """Each rank takes every world-th problem and scales its summed loss (train_tiny.batch_loss) so that
    DDP's mean gradient is the global batch's: factors after two SGD steps, and the global batches'
    losses, as in one process."""
    import train_tiny
    tmp_path = launched("ddp", "float32")
    single = tiny_gpt_with_sorsa()
    losses = tiny_steps(single, train_tiny.Runtime(torch.device("cpu")))
    expected = sorsa.adapter_state_dict(single)
    for rank in range(2):
        got = torch.load(tmp_path / f"tiny{rank}.pt", weights_only=True)
        assert got.pop("losses") == pytest.approx(losses, rel=1e-5)  # float32 sums in another order
        for k, v in expected.items():
            assert torch.allclose(got[k], v, rtol=0, atol=1e-5 * (1 + v.abs().max().item())), k


@pytest.mark.slow  # 20 s on 2 cores
def test_train_tiny_under_torchrun_matches_one_process(tmp_path):
    """torchrun train_tiny.py (DDP, 2 processes) trained on rank-split global batches: the single-process
    losses; rank 0 alone prints. (Its step at gradient level: the ddp worker's tiny_steps, with SGD.)"""
    import train_tiny
    args = ["--quick", "--methods", "sorsa", "--steps", "3", "--batch_size", "8", "--pretrain_steps", "30",
            "--test_size", "10", "--cache", str(tmp_path / "cache")]
    out = torchrun("train_tiny.py", *args, "--out", str(tmp_path / "ddp"))
    assert "2 process(es)" in out and out.count("base model: eval loss") == 1  # rank 0 alone prints
    train_tiny.run(train_tiny.parse_args(args + ["--out", str(tmp_path / "one")]))
    ddp_rows = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    one_rows = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in one_rows] == [1, 2, 3]
    # Step 1's loss is the global batch's, before any update: float32 sums in another order.
    assert abs(ddp_rows[0]["train_loss"] - one_rows[0]["train_loss"]) <= 1e-5 * one_rows[0]["train_loss"]
    # Later ones drift apart by AdamW alone: its first steps move every coordinate by about lr
    # whatever the gradient's size, so rounding-level differences in tiny gradients grow (exact
    # gradients: test_processes_train_..., and the demo's batch_loss in the ddp worker, with SGD).
    for a, b in zip(ddp_rows[1:], one_rows[1:]):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.01 * b["train_loss"], (a, b)


# ----------------------------------------------------------------------------- adapting after sharding


SPLIT_TARGETS = ["q_proj", "v_proj", "up", "down"]
SPLIT_WIDTHS = dict(d=120, h=25)  # wide enough that the randomized split sums two 120 x 120 layers in one message
SPLIT_CASES = [("float32", None), ("bfloat16", None), ("float32", 2), ("bfloat16", 2)]  # (base dtype, niter)


def off_orthonormality(model):
    """Move U_p and Vt_p by the same 0.1 noise, whole or sharded (each rank its part), where Eq. 4's gradient is
    smooth: at orthonormality its direction follows the SVD's rounding, which varies with threads."""
    from test_sorsa import rand
    with torch.no_grad():
        for i, (_, mod) in enumerate(sorsa.sorsa_modules(model)):
            for j, p in enumerate((mod.U_p, mod.Vt_p)):
                si._local(p).add_(si._part(0.1 * rand(*p.shape, seed=10 * i + j, dtype=torch.float32), p))


def split_reference(dtype, niter):
    """One process: the base model, and it adapted whole (sorsa.apply_sorsa, on one thread as torchrun's workers run:
    LAPACK's SVD rounds differently on two), with an input batch of 12."""
    from test_sorsa import rand, toy_model
    base = toy_model(0, **SPLIT_WIDTHS, dtype=getattr(torch, dtype))
    with torch.no_grad():  # a decaying spectrum, as pretrained weights have: the top r singular triplets stand apart
        for layer in base.modules():
            if isinstance(layer, nn.Linear):
                layer.weight.mul_(0.9 ** torch.arange(layer.in_features, dtype=layer.weight.dtype))
    model = copy.deepcopy(base)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        sorsa.apply_sorsa(model, 4, SPLIT_TARGETS, niter=niter)
    finally:
        torch.set_num_threads(threads)
    x = rand(12, SPLIT_WIDTHS["d"], seed=7, dtype=base[0].q_proj.weight.dtype)
    return base, model, x


@pytest.mark.parametrize("nproc", [2, pytest.param(3, marks=SLOW)])
def test_a_model_sharded_before_its_split_equals_one_process(launched, nproc):
    """Built on the meta device, adapted there for its shapes, fully_shard-ed, loaded with the base weights
    by set_model_state_dict, then si.split_sharded: the exact SVD of each layer's gathered W_0 by one rank in
    turn; the randomized one with no W_0 ever gathered (the ranks' rows multiplied where they lie, two 120 x 120
    layers summed in one message). Widths SPLIT_WIDTHS, so the ranks hold uneven rows (13 + 12, 9 + 9 + 7) of a
    width-25 W_r and keep a width-25 Vt_p on rows; one randomized case holds a W_r by columns, which is gathered in a
    turn beside a sketched layer; the weights' spectra decay, as pretrained ones do. Against sorsa.apply_sorsa in one
    process: the factors, W_r and the output to rounding (exact: float32, 1e-5; randomized: float32 products summed
    in another order, then QRs of a sketch whose columns the power iterations make nearly parallel, 1e-4 (1.1e-5
    seen; on random weights' flat spectra up to 2.5e-4); bf16 W_r: one bf16 rounding); 3 SGD
    steps as the other FSDP2 tests; the adapter, the PEFT export and the merge. A NaN in one rank's shard raises
    on every rank, unchanged; an SVD failing on the last rank in the second turn raises on every rank, saying how
    far the split got, and so (randomized) does a QR failing on the last rank amid the first turn's collectives."""
    out = launched("fsdp", "float32", nproc) / "split"  # the FSDP2 worker runs split_cases too: one launch
    for dtype, niter in SPLIT_CASES:
        base, single, x = split_reference(dtype, niter)
        got = torch.load(out / f"{dtype}-{niter}.pt", weights_only=True)
        factor_tol = 1e-5 if niter is None else 1e-4
        weight_tol = factor_tol if dtype == "float32" else 2 ** -7  # W_r: float32 sums in another order; bf16 rounding
        layers_gathered = 8 if niter is None else 1 if mixed(dtype, niter) else 0
        assert got["gathered"] == layers_gathered * nproc, got["gathered"]  # _gather_to's calls, on all ranks
        if niter is not None:  # float32: two 120 x 120 layers' W_0 X (120 x 14 each) in one message; a bf16 W_0's
            # float32 copy of its rows leaves no room beside one layer: one at a time
            assert got["largest_sum"] == (2 if dtype == "float32" else 1) * 120 * 14, got["largest_sum"]
        for name, mod in sorsa.sorsa_modules(single):
            for key in ("U_p", "S_p", "Vt_p", "U_p0", "S_p0", "Vt_p0", "W_r"):
                want, have = getattr(mod, key).detach(), got["split"][f"{name}.{key}"]
                assert have.dtype == want.dtype, (name, key)
                tol = weight_tol if key == "W_r" else factor_tol
                assert torch.allclose(have.double(), want.double(), rtol=0, atol=tol * want.abs().max().item()), (name, key)
        with torch.no_grad():
            tol = 1e-5 if dtype == "float32" else 2e-2
            assert torch.allclose(got["output"], single(x).float(), rtol=0, atol=tol * 10)
            assert got["refused"].startswith("split_sharded changed nothing: rank") and "NaN" in got["refused"]
            assert got["unchanged"]
            assert got["midway"].startswith(f"split_sharded split {nproc} of 8 layers before this error, the rest still "
                                            "hold W_0") and f"rank {nproc - 1}: _LinAlgError: the SVD did not" in got["midway"]
            if niter is not None:  # every rank's QRs of the first turn's sums, amid its collectives: none waits
                assert got["amid"].startswith("split_sharded changed nothing: rank") \
                    and f"rank {nproc - 1}: _LinAlgError: the QR did not" in got["amid"], got["amid"]
        off_orthonormality(single)
        train(single, x, torch.sin(3 * x), "fsdp")
        for k, v in sorsa.adapter_state_dict(single).items():
            assert torch.allclose(got["trained"][k], v, rtol=0, atol=tol * (1 + v.abs().max().item())), k
        fresh = copy.deepcopy(base)
        si.load_adapter(fresh, out / f"{dtype}-{niter}-adapter.pt")
        lora = load_file(out / f"{dtype}-{niter}-lora" / "adapter_model.safetensors")
        expected_lora = si.lora_state_dict(single)
        assert all(torch.allclose(lora[f"base_model.model.{k}"], v, rtol=0, atol=tol * (1 + v.abs().max().item()))
                   for k, v in expected_lora.items())
        sorsa.merge_sorsa(single)
        with torch.no_grad():
            assert torch.allclose(fresh(x).float(), single(x).float(), atol=10 * tol)
            assert torch.allclose(got["merged"], single(x).float(), atol=10 * tol)


def mixed(dtype, niter):
    """Whether a split case holds 0.v_proj's W_r (18 x 18) by columns: gathered in a turn beside a sketched layer."""
    return dtype == "float32" and niter is not None


def failing_split(model, niter, here, owner, name, what):
    """split_sharded's error (its message) when, on this rank if `here`, owner.name raises at its second call."""
    real, calls = getattr(owner, name), []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.linalg.LinAlgError(f"{what} did not converge")
        return real(*args, **kwargs)
    if here:
        setattr(owner, name, failing)
    try:
        si.split_sharded(model, niter)
        return ""
    except ValueError as err:
        return str(err)
    finally:
        setattr(owner, name, real)


def split_cases(out):
    """Each case of SPLIT_CASES: meta, apply_sorsa, fully_shard, to_empty, a poisoned load refused, the real
    load, split_sharded; what it gives, gathered, written by rank 0 into out."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(out, exist_ok=True)
    for dtype, niter in SPLIT_CASES:
        base, _, x = split_reference(dtype, niter)
        model = copy.deepcopy(base).to("meta")  # as built with torch.device("meta"): shapes, no memory
        si.apply_sorsa(model, 4, SPLIT_TARGETS, niter=niter)
        placement = si.fsdp_shard_placement(model)
        if mixed(dtype, niter):  # one W_r held by columns: gathered whole in a turn with a layer sketched
            def placement(param, by_columns=model[0].v_proj.W_r, by_default=placement):
                return Shard(1) if param is by_columns else by_default(param)
        for block in model:
            fully_shard(block, shard_placement_fn=placement)
        fully_shard(model, shard_placement_fn=placement)
        model.to_empty(device="cpu")
        options = StateDictOptions(full_state_dict=True, strict=False)  # U_p, S_p, Vt_p come from the split
        poisoned = {k: v.clone() for k, v in base.state_dict().items()}
        poisoned["1.up.weight"][-1, 0] = float("nan")  # the last rows: the last rank's shard alone
        set_model_state_dict(model, si.base_state_for_sorsa(model, poisoned), options=options)
        before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
        try:
            si.split_sharded(model, niter)
            refused = ""
        except ValueError as err:
            refused = str(err)
        unchanged = all(torch.equal(before[k].flatten().view(torch.uint8), v.to_local().flatten().view(torch.uint8))
                        for k, v in model.state_dict().items())  # bit for bit: to_empty's memory may hold NaN
        set_model_state_dict(model, si.base_state_for_sorsa(model, base.state_dict()), options=options)
        midway = failing_split(model, niter, rank == world - 1, sorsa, "_top_triplets", "the SVD")  # its second call
        set_model_state_dict(model, si.base_state_for_sorsa(model, base.state_dict()), options=options)  # again
        amid = ""
        if niter is not None:  # the last rank's second QR: in the first turn's
            amid = failing_split(model, niter, rank == world - 1, torch.linalg, "qr", "the QR")
            set_model_state_dict(model, si.base_state_for_sorsa(model, base.state_dict()), options=options)
        gathers, sums, real_gather, real_all_reduce = [0], [0], si._gather_to, dist.all_reduce

        def counted(*args):
            gathers[0] += 1
            return real_gather(*args)

        def summing(tensor, **kwargs):  # the largest message: how many layers the split sums at once
            sums[0] = max(sums[0], tensor.numel())
            return real_all_reduce(tensor, **kwargs)
        si._gather_to, dist.all_reduce = counted, summing
        si.split_sharded(model, niter)
        si._gather_to, dist.all_reduce = real_gather, real_all_reduce
        gathered = [None] * world
        dist.all_gather_object(gathered, gathers[0])
        split = {k: v.full_tensor() for k, v in model.state_dict().items() if "." in k and k.rsplit(".", 1)[1] in
                 ("U_p", "S_p", "Vt_p", "U_p0", "S_p0", "Vt_p0", "W_r")}
        with torch.no_grad():
            output = model(x).float()
        local = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        off_orthonormality(model)
        train(model, x[local], torch.sin(3 * x[local]), "fsdp")
        trained = sorsa.adapter_state_dict(model)
        si.save_adapter(model, os.path.join(out, f"{dtype}-{niter}-adapter.pt"))
        si.save_lora(model, os.path.join(out, f"{dtype}-{niter}-lora"))
        sorsa.merge_sorsa(model)
        with torch.no_grad():
            merged = model(x).float()
        if rank == 0:
            torch.save({"split": split, "output": output, "refused": refused, "unchanged": unchanged, "midway": midway,
                        "amid": amid, "gathered": sum(gathered), "largest_sum": sums[0], "trained": trained,
                        "merged": merged},
                       os.path.join(out, f"{dtype}-{niter}.pt"))


def gradient_cases(out):
    """Each case of GRADIENT_CASES: one backward on this rank's share of the batch; the gradients gathered, and
    the names of those not in their factor's placement, written by rank 0 into out."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    rank, world = dist.get_rank(), dist.get_world_size()
    os.makedirs(out, exist_ok=True)
    for placement, way in GRADIENT_CASES:
        _, model, x, target = model_and_batch(torch.float32)
        options = {"shard_placement_fn": si.fsdp_shard_placement(model)} if placement != "fully_shard" else {}
        for block in model:
            fully_shard(block, **options)
        fully_shard(model, **options)
        local = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        regularized_backward(model, x[local], target[local], way)
        grads, misplaced = {}, []
        for name, mod in sorsa.sorsa_modules(model):
            for k in ("U_p", "S_p", "Vt_p"):
                param = getattr(mod, k)
                if param.grad.placements != param.placements:
                    misplaced.append(f"{name}.{k}: {param.grad.placements} for {param.placements}")
                grads[f"{name}.{k}"] = param.grad.full_tensor()
        if rank == 0:
            torch.save({**grads, "misplaced": misplaced}, os.path.join(out, f"{placement}-{way}.pt"))


# ----------------------------------------------------------------------------- the worker, run by torchrun



def worker(*cases_then_folder):
    """Each case ("ddp-float32", ...) in one process group, each writing into folder/case."""
    import torch.distributed as dist

    *cases, folder = cases_then_folder
    dist.init_process_group("gloo")
    for case in cases:
        out = os.path.join(folder, case)
        os.makedirs(out, exist_ok=True)
        run_case(*case.split("-"), out)
    si.end_distributed()  # not a plain destroy_process_group: its docstring says why


def run_case(engine, dtype, out):
    """One case: DDP or FSDP2 training, the saves and the merge; under DDP train_tiny's step too, and under
    FSDP2 in float32 the split after sharding (split_cases)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    import train_tiny

    rank, world = dist.get_rank(), dist.get_world_size()
    _, model, x, target = model_and_batch(getattr(torch, dtype))
    report = {"regularizer_before": None, "broadcast_bytes": sum(b.nbytes for b in model.buffers())}
    if engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)  # default broadcast_buffers=True
    else:
        placement = si.fsdp_shard_placement(model)
        for block in model:
            fully_shard(block, shard_placement_fn=placement)
        wrapped = fully_shard(model, shard_placement_fn=placement)
        layers = [mod for _, mod in sorsa.sorsa_modules(model)]
        report["W_r_local_fraction"] = [m.W_r.to_local().numel() / m.W_r.numel() for m in layers]
        report["W_r_dtypes"] = [str(m.W_r.dtype) for m in layers]
        report["Vt_p_placements"] = [str(m.Vt_p.placements[0]) for m in layers]
    with CommDebugMode() as seen:  # DTensor's count of the collectives it runs, its own redistributions included
        report["regularizer_before"] = sorsa.orthonormal_regularizer(wrapped).item()
    report["regularizer_collectives"] = [str(op).split(".")[-1] for op, n in seen.get_comm_counts().items() for _ in range(n)]
    local = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # this rank's share of the global batch
    train(wrapped, x[local], target[local], engine)
    report["regularizer_after"] = sorsa.orthonormal_regularizer(wrapped).item()
    gathered = sorsa.adapter_state_dict(wrapped)  # every rank: FSDP2's shards gathered
    torch.save(gathered, os.path.join(out, f"rank{rank}.pt"))
    real_replace = os.replace
    if rank == 0:  # rank 0 writes slowly: a rank that returned before the file is complete would not find it
        os.replace = lambda *paths: (time.sleep(0.5), real_replace(*paths))[1]
    si.save_adapter(wrapped, os.path.join(out, "adapter.pt"))  # rank 0 writes
    loaded = si.load_checked(os.path.join(out, "adapter.pt"))[0] if rank == 1 else None  # at once
    si.save_lora(wrapped, os.path.join(out, "lora"))
    os.replace = real_replace  # the next writes at full speed
    try:  # rank 0 cannot write here: every rank raises, none waits for it
        si.save_adapter(wrapped, os.path.join(out, "no such folder", "adapter.pt"))
    except (OSError, RuntimeError) as err:
        failure = f"{type(err).__name__}: {err}"
    if rank == 1:
        with open(os.path.join(out, "rank1_loaded.json"), "w") as f:
            json.dump({"adapter": all(torch.equal(loaded[k], gathered[k]) for k in gathered),
                       "lora_files": len(os.listdir(os.path.join(out, "lora"))), "failure": failure}, f)
    report["merged_names"] = sorsa.merge_sorsa(wrapped)  # in place, through the wrapper (FSDP2: gathered)
    with torch.no_grad():
        report["merged_output"] = wrapped(x).float().tolist()
    if engine == "ddp":  # train_tiny's own step: each rank's share of a global batch, SGD
        rt = train_tiny.Runtime(torch.device("cpu"), rank=rank, world=world)
        tiny = train_tiny.distribute(tiny_gpt_with_sorsa(), rt)
        losses = tiny_steps(tiny, rt)
        torch.save({**sorsa.adapter_state_dict(tiny), "losses": losses}, os.path.join(out, f"tiny{rank}.pt"))
    if engine == "fsdp" and dtype == "float32":  # test_fsdp2_gradients_..., test_a_model_sharded_before_...
        gradient_cases(os.path.join(out, "gradients"))
        split_cases(os.path.join(out, "split"))
    if rank == 0:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    worker(*sys.argv[1:])
