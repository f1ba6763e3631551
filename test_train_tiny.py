"""The quick path of train_tiny.py, in-process with tiny sizes, and its bad-input handling."""

import os

import pytest
import torch

import train_tiny
from train_tiny import Config, GPTConfig


def tiny_config(tmp_path, **overrides):
    """A run small enough for the default test suite (a few seconds per method on 2 cores)."""
    cfg = dict(steps=30, pretrain_steps=150, test_size=40, rank=4, batch_size=16,
               model=GPTConfig(n_layer=1, d_model=32), out=str(tmp_path / "out"), cache=str(tmp_path / "cache"))
    cfg.update(overrides)
    return Config(**cfg)


def test_every_method_lowers_the_eval_loss_and_sorsa_merges_and_reloads_exactly(tmp_path):
    report = train_tiny.run(tiny_config(tmp_path))
    base_loss = report["base"][0]
    assert set(report["results"]) == set(train_tiny.METHODS)
    for method, (result,) in report["results"].items():
        assert result["eval_loss"] < base_loss, method
    rows, adapter_bytes, base_bytes = report["checks"]
    merged_acc, merged_diff = rows["merged"]
    reloaded_acc, reloaded_diff = rows["reloaded"]
    sorsa_acc = report["results"]["sorsa"][0]["accuracy"]
    assert merged_diff < 1e-4 and reloaded_diff < 1e-4  # float32 logits of size ~10
    assert merged_acc == reloaded_acc == sorsa_acc
    assert adapter_bytes < base_bytes
    assert os.path.getsize(report["log"]) > 0


def test_base_model_is_cached_and_a_corrupt_cache_is_rebuilt(tmp_path, capsys):
    cfg = tiny_config(tmp_path, pretrain_steps=20)
    first, path = train_tiny.base_model(cfg, torch.device("cpu"), lambda *a: None)
    again, same_path = train_tiny.base_model(cfg, torch.device("cpu"), lambda *a: None)
    assert same_path == path and "cached" in capsys.readouterr().out
    for a, b in zip(first.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a.cpu(), b)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    rebuilt, _ = train_tiny.base_model(cfg, torch.device("cpu"), lambda *a: None)
    assert "unusable" in capsys.readouterr().out
    for a, b in zip(first.state_dict().values(), rebuilt.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu())  # pretraining is deterministic


@pytest.mark.parametrize("argv, words", [
    (["--rank", "97"], "--rank 97 is outside [1, 96]"),
    (["--rank", "0"], "--rank 0 is outside"),
    (["--methods", "sorsa,dora"], "unknown method(s) dora"),
    (["--targets", "lm_head"], "unknown target(s) lm_head"),
    (["--steps", "0"], "--steps and --seeds must be >= 1"),
])
def test_bad_arguments_exit_with_status_2_and_a_message(argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.parse_args(argv)
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_exits_with_status_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.parse_args(["--device", "cuda"])
    assert exit_info.value.code == 2 and "sees no CUDA GPU" in capsys.readouterr().err


def test_unwritable_out_exits_with_status_2(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        train_tiny.parse_args(["--out", str(blocker / "out")])
    assert exit_info.value.code == 2 and "cannot write to" in capsys.readouterr().err
