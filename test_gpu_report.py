"""gpu_report.sh, the one GPU run, end to end at reduced size on the CPU: so that the device call, which
has 15 minutes in all, cannot fail on a typo, a missing import or a renamed flag."""

import importlib.util
import json
import os
import subprocess

import pytest

PARTS = ["env", "pytest", "train_tiny", "bench_llama", "bench_peft", "bench_nf4"]  # in the order they run


@pytest.mark.slow  # about two minutes with transformers, peft and torchao: .ci/run runs it after the default run
def test_the_gpu_report_runs_every_part_on_the_cpu_and_writes_a_line_for_each(tmp_path):
    root = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(["bash", os.path.join(root, "gpu_report.sh"), str(tmp_path), "--quick"], env=env,
                          capture_output=True, text=True, timeout=600)
    rows = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
    assert [row["part"] for row in rows] == PARTS, proc.stdout + proc.stderr
    logs = {row["part"]: (tmp_path / f"{row['part']}.log").read_text() for row in rows}
    for row in rows[:3]:  # these need nothing beyond requirements.txt
        assert row["rc"] == 0 and not row["timed_out"], logs[row["part"]]
    assert rows[1]["pytest"].startswith("1 passed")  # the CPU case of the selected test; its CUDA case skipped
    assert [json.loads(line)["step"] for line in (tmp_path / "train_tiny.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    hf = all(importlib.util.find_spec(name) for name in ("transformers", "peft"))
    for row in rows[3:5]:  # bench.py: section 6 and section 8, each its summary as the last line
        if hf:
            assert row["rc"] == 0 and row["result"]["quick"] is True, logs[row["part"]]
        else:
            assert "transformers" in logs[row["part"]], logs[row["part"]]
    if hf:
        assert {"llama_reg_share_bf16", "llama_reg_share_fp32_autocast"} <= rows[3]["result"].keys()
        assert 0 < rows[3]["result"]["llama_reg_share_fp32_autocast"] < 1
    if importlib.util.find_spec("torchao"):  # section 9, the 16 GB recipe at reduced size (transformers: its parts)
        assert rows[5]["rc"] == 0 and 0 < rows[5]["result"]["nf4_layer_time_over_bf16"], logs["bench_nf4"]
        assert rows[5]["result"]["nf4_7b_training_state_gb"] < 16 and rows[5]["result"]["quick"] is True
    else:
        assert "torchao" in logs["bench_nf4"], logs["bench_nf4"]
    assert proc.returncode == (0 if all(row["rc"] == 0 for row in rows) else 1)
    assert sorted(os.listdir(tmp_path)) == sorted([f"{p}.log" for p in PARTS] + ["report.jsonl", "train_tiny.jsonl"])
