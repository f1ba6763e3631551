"""SORSA under DDP and FSDP2: 2 gloo processes started by torchrun, compared with one process.

Each test runs this file as torchrun's script (the worker at the bottom). torchrun --standalone
picks a free port; a child that fails or hangs fails the test with its output (tracebacks
included) after a timeout, never hangs CI. The worker writes what it measured; the test
asserts. Tolerances: float32 reductions in another order, a few eps_32 of the values.
"""

import copy
import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn as nn

import sorsa

STEPS, LR, GAMMA = 3, 0.05, 0.05  # SGD: the factors move linearly in the gradients, so any error shows
TIMEOUT = 120  # seconds for one torchrun launch; normal runs take 5-15 s


def torchrun(*args, nproc=2):
    """Run `torchrun --standalone --nproc_per_node nproc *args` with a timeout; its output. The last
    argument must be unique to this launch: it finds the workers to kill if torchrun cannot."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a stray worker cannot block the read
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                cwd=os.path.dirname(os.path.abspath(__file__)))
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            stop(proc, args[-1])
            log.seek(0)
            pytest.fail(f"torchrun {' '.join(args)} hung for {TIMEOUT} s; its output:\n{log.read()}")
        log.seek(0)
        out = log.read()
    assert proc.returncode == 0, f"torchrun {' '.join(args)} failed (exit {proc.returncode}):\n{out}"
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


def model_and_batch(dtype):
    """A small adapted model (even sizes: each of 2 ranks holds exactly half of every tensor) and a
    global batch of 8. The factors are moved off orthonormality so the regularizer has a gradient."""
    from test_sorsa import rand, toy_model
    base = toy_model(0, d=12, h=20, dtype=dtype)
    model = copy.deepcopy(base)
    sorsa.apply_sorsa(model, 4, ["q_proj", "v_proj", "up", "down"])
    with torch.no_grad():
        for i, (_, mod) in enumerate(sorsa.sorsa_modules(model)):
            mod.U_p.add_(0.1 * rand(*mod.U_p.shape, seed=i, dtype=torch.float32))
            mod.Vt_p.add_(0.1 * rand(*mod.Vt_p.shape, seed=100 + i, dtype=torch.float32))
    x = rand(8, 12, seed=7, dtype=dtype)
    return base, model, x, torch.sin(3 * x)


def train(model, x, target, steps=STEPS):
    """SGD on Eq. 6 with a mean-squared task loss; an optimizer over model.parameters(), as users write it."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        sorsa.sorsa_loss((model(x) - target).float().square().mean(), model, GAMMA, LR).backward()
        opt.step()


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """launched(engine, dtype): the folder of one worker launch, each launched once per test session."""
    folders = {}

    def launch(engine, dtype):
        if (engine, dtype) not in folders:
            folder = tmp_path_factory.mktemp(f"{engine}-{dtype}")
            torchrun(__file__, engine, dtype, str(folder))
            folders[engine, dtype] = folder
        return folders[engine, dtype]
    return launch


@pytest.mark.parametrize("engine, dtype", [("ddp", "float32"), ("fsdp", "float32"), ("fsdp", "bfloat16")])
def test_two_processes_train_as_one_process_does_on_the_same_global_batch(launched, engine, dtype):
    tmp_path = launched(engine, dtype)
    report = json.loads((tmp_path / "report.json").read_text())
    base, single, x, target = model_and_batch(getattr(torch, dtype))
    reg0 = sorsa.orthonormal_regularizer(single).item()
    train(single, x, target)
    expected = sorsa.adapter_state_dict(single)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0].keys() == ranks[1].keys() == expected.keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in expected)  # both ranks hold one model
    # bf16 base: the task gradient passes through bf16 activations computed in other batch splits.
    tol = 1e-5 if dtype == "float32" else 2e-2
    for k, v in expected.items():
        assert torch.allclose(ranks[0][k], v, rtol=0, atol=tol * (1 + v.abs().max().item())), k
    assert abs(report["regularizer_before"] - reg0) <= 1e-6 * (1 + reg0)  # the sharded Gram sum is the whole one
    assert abs(report["regularizer_after"] - sorsa.orthonormal_regularizer(single).item()) <= tol
    assert report["broadcast_bytes"] == 0  # DDP broadcasts buffers every step; the layer has none
    if engine == "fsdp":  # each rank holds half of every frozen residual, in the weight's dtype
        assert report["W_r_local_fraction"] and set(report["W_r_local_fraction"]) == {0.5}
        assert set(report["W_r_dtypes"]) == {str(getattr(torch, dtype))}
        # The sharded factors' Gram matrices are summed (all-reduce), the factors never gathered.
        names = report["regularizer_collectives"]
        assert names and not any("gather" in name for name in names) and any("allreduce" in name for name in names)
    else:
        assert report["regularizer_collectives"] == []  # DDP: every rank holds whole factors
    # What a wrapped model saved loads onto the plain base and reproduces the trained model.
    fresh = copy.deepcopy(base)
    sorsa.load_adapter(fresh, tmp_path / "adapter.pt")
    with torch.no_grad():
        assert torch.allclose(fresh(x).float(), single(x).float(), atol=10 * tol)
    lora = torch.load(tmp_path / "lora" / "adapter_model.bin", weights_only=True)
    assert all(k.startswith("base_model.model.") and ".module." not in k for k in lora)
    names = [name for name, _ in sorsa.sorsa_modules(single)]
    sorsa.merge_sorsa(single)
    assert report["merged_names"] == names
    with torch.no_grad():
        assert torch.allclose(torch.tensor(report["merged_output"]), single(x).float(), atol=10 * tol)


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
    """train_tiny.train_step on its global batches of 8 problems, with SGD instead of AdamW."""
    import train_tiny
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR)
    for problems in train_tiny.training_batches(0, train_tiny.Config(steps=steps, batch_size=8), set()):
        train_tiny.train_step(model, opt, params, problems, GAMMA, LR, rt)


def test_train_tiny_step_on_rank_shares_is_the_single_process_step(launched):
    """Each rank takes every world-th problem and scales its summed loss so that DDP's mean
    gradient is the global batch's: factors after two SGD steps as in one process."""
    import train_tiny
    tmp_path = launched("ddp", "float32")
    single = tiny_gpt_with_sorsa()
    tiny_steps(single, train_tiny.Runtime(torch.device("cpu")))
    expected = sorsa.adapter_state_dict(single)
    for rank in range(2):
        got = torch.load(tmp_path / f"tiny{rank}.pt", weights_only=True)
        for k, v in expected.items():
            assert torch.allclose(got[k], v, rtol=0, atol=1e-5 * (1 + v.abs().max().item())), k


def test_train_tiny_under_torchrun_matches_one_process(tmp_path):
    """train_tiny.py's DDP path: rank-split global batches give the single-process losses."""
    import train_tiny
    args = ["--quick", "--methods", "sorsa", "--steps", "6", "--batch_size", "8", "--pretrain_steps", "30",
            "--test_size", "10", "--val_size", "10", "--cache", str(tmp_path / "cache")]
    out = torchrun("train_tiny.py", *args, "--out", str(tmp_path / "ddp"))
    assert "2 process(es)" in out and out.count("base model: eval loss") == 1  # rank 0 alone prints
    train_tiny.run(train_tiny.parse_args(args + ["--out", str(tmp_path / "one")]))
    ddp_rows = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    one_rows = [json.loads(line) for line in open(tmp_path / "one" / "log.jsonl")]
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in one_rows] == [1, 2, 3, 4, 5, 6]
    # Step 1's loss is the global batch's, before any update: float32 sums in another order.
    assert abs(ddp_rows[0]["train_loss"] - one_rows[0]["train_loss"]) <= 1e-5 * one_rows[0]["train_loss"]
    # Later ones drift apart by AdamW alone: its first steps move every coordinate by about lr
    # whatever the gradient's size, so rounding-level differences in tiny gradients grow (exact
    # gradients: test_two_processes_..., and train_step itself in the ddp worker, with SGD).
    for a, b in zip(ddp_rows[1:], one_rows[1:]):
        assert abs(a["train_loss"] - b["train_loss"]) <= 0.01 * b["train_loss"], (a, b)


# ----------------------------------------------------------------------------- the worker, run by torchrun


class Collectives(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the collective operations dispatched inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if "all_" in name or "allreduce" in name or "broadcast" in name:
            self.names.append(name)
        return func(*args, **(kwargs or {}))



def worker(engine, dtype, out):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    _, model, x, target = model_and_batch(getattr(torch, dtype))
    report = {"regularizer_before": None, "broadcast_bytes": sum(b.nbytes for b in model.buffers())}
    if engine == "ddp":
        wrapped = nn.parallel.DistributedDataParallel(model)  # default broadcast_buffers=True
    else:
        placement = sorsa.fsdp_shard_placement(model)
        for block in model:
            fully_shard(block, shard_placement_fn=placement)
        wrapped = fully_shard(model, shard_placement_fn=placement)
        W_r = [mod.W_r for _, mod in sorsa.sorsa_modules(model)]
        report["W_r_local_fraction"] = [w.to_local().numel() / w.numel() for w in W_r]
        report["W_r_dtypes"] = [str(w.dtype) for w in W_r]
    with Collectives() as seen:
        report["regularizer_before"] = sorsa.orthonormal_regularizer(wrapped).item()
    report["regularizer_collectives"] = seen.names
    local = slice(rank * len(x) // world, (rank + 1) * len(x) // world)  # this rank's share of the global batch
    train(wrapped, x[local], target[local])
    report["regularizer_after"] = sorsa.orthonormal_regularizer(wrapped).item()
    torch.save(sorsa.adapter_state_dict(wrapped), os.path.join(out, f"rank{rank}.pt"))  # every rank: gathered
    sorsa.save_adapter(wrapped, os.path.join(out, "adapter.pt"))  # rank 0 writes
    sorsa.save_lora(wrapped, os.path.join(out, "lora"))
    report["merged_names"] = sorsa.merge_sorsa(wrapped)  # in place, through the wrapper (FSDP2: gathered)
    with torch.no_grad():
        report["merged_output"] = wrapped(x).float().tolist()
    if engine == "ddp":  # train_tiny's own step: each rank's share of a global batch, SGD
        import train_tiny
        rt = train_tiny.Runtime(torch.device("cpu"), rank=rank, world=world)
        tiny = train_tiny.distribute(tiny_gpt_with_sorsa(), "sorsa", rt)
        tiny_steps(tiny, rt)
        torch.save(sorsa.adapter_state_dict(tiny), os.path.join(out, f"tiny{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out, "report.json"), "w") as f:
            json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    worker(*sys.argv[1:])
