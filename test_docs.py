"""Every command the pages give runs as written: each command line of train_tiny.py, bench.py,
theory.comparison and the theory scripts in README.md, docs/ and theory/README.md, and each flag
quoted on its own after such a command, is parsed by that script's own argument parser, so that a
renamed or misspelt flag turns this red; and (marked slow) each is run, at a reduced size, as the page
gives it (torchrun's lines under torchrun), so that a broken section turns it red too."""

import argparse
import copy
import os
import pathlib
import re
import shlex
import sys

import pytest
import torch

import bench
import theory
import train_tiny
from theory import comparison

ROOT = pathlib.Path(__file__).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "theory" / "README.md"]
SCRIPTS = {  # what a page names -> that script's parser
    "train_tiny.py": train_tiny.argument_parser,
    "bench.py": bench.argument_parser,
    "theory.comparison": comparison.argument_parser,
    **{f"theory.{name}": lambda: theory.argument_parser("") for name in ("condition_number", "eq14", "nf4",
                                                                        "fused_forward", "gamma", "regularizer")},
}
COMMAND = re.compile(r"(?:python3? (?:-m )?|(torchrun) (?:--\S+ )*(?:\d+ )?)(train_tiny\.py|bench\.py|theory\.\w+)"
                     r"((?: (?!#)[^`\n|]+)?)")
FLAGS = re.compile(r"`(--[a-z_]+(?: [^`]*)?)`")


def documented():
    """(page, script, argument list, whole, torchrun) for every command line (whole=True; torchrun: whether the
    page starts it with torchrun), and for every flag quoted alone (whole=False), checked against the script
    named nearest to it in its section of the page."""
    found = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")  # a shell line continued with a backslash
        for section in re.split(r"\n(?=#+ )", text):
            commands = [(m.start(), m.group(2)) for m in COMMAND.finditer(section)]
            for m in COMMAND.finditer(section):
                args = m.group(3).split("#")[0].replace("...", "1e-3")  # "--lrs ..." stands for a list
                found.append((page.name, m.group(2), shlex.split(args), True, bool(m.group(1))))
            for m in FLAGS.finditer(section) if commands else ():
                script = min(commands, key=lambda c: abs(c[0] - m.start()))[1]
                found.append((page.name, script, shlex.split(m.group(1)), False, False))
    return found


CASES = documented()


def test_the_pages_give_commands_of_every_script():
    assert {script for _, script, _, _, _ in CASES} >= {"train_tiny.py", "bench.py", "theory.comparison",
                                                        "theory.regularizer"}
    assert {script for _, script, _, _, torchrun in CASES if torchrun} == {"train_tiny.py", "bench.py"}


@pytest.mark.parametrize("page, script, args, whole, torchrun", CASES,
                         ids=[f"{p}:{s} {' '.join(a)}" for p, s, a, _, _ in CASES])
def test_each_documented_command_parses_with_its_scripts_own_parser(page, script, args, whole, torchrun):
    parser = SCRIPTS[script]()
    if not whole:  # a flag quoted alone: the others a full command needs are not there
        parser = copy.deepcopy(parser)
        for action in parser._actions:
            action.required = False
    try:
        parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{page}: `{script} {' '.join(args)}` is not accepted by {script}'s argument parser")


# ----------------------------------------------------------------------------- each command, run at a reduced size

REDUCED = {  # after the documented arguments, so that these sizes win: seconds, not minutes
    "train_tiny.py": ["--quick", *(f"--{k}={v}" for k, v in theory.TINY_RUNS.items())],
    "theory.comparison": ["--quick", *(f"--{k}={v}" for k, v in theory.TINY_RUNS.items()),
                          "--val_size=8", "--lrs=2e-3,8e-3", "--seeds=1", "--final_seeds=2", "--base_seeds=0"],
    "bench.py": ["--quick"],
}


def reduced(script, args):
    """The arguments that run a documented command at a reduced size; without a CUDA GPU, --device cuda runs
    on the CPU (the code is the same but for the device)."""
    args = [("cpu" if a == "cuda" and not torch.cuda.is_available() else a) for a in args]
    return args + REDUCED.get(script, ["--quick"])  # theory's scripts: --quick


def runs():
    """(script, reduced arguments, torchrun) of every command line, and of every flag of the demo and the
    benchmark quoted alone; commands that parse to the same settings run once."""
    found = {}
    for _, script, args, whole, torchrun in CASES:
        if whole or script in ("train_tiny.py", "bench.py"):
            args = reduced(script, args)
            try:
                settings = repr(sorted(vars(SCRIPTS[script]().parse_args(args)).items()))
            except SystemExit:  # the parse test names it; this one runs it and shows the script's message
                settings = repr(args)
            found.setdefault((script, torchrun, settings), (script, args, torchrun))
    return sorted(found.values())


RUNS = runs()


@pytest.mark.slow  # 7 minutes in all on 2 cores: each command starts Python, torch and its work
@pytest.mark.parametrize("script, args, torchrun", RUNS,
                         ids=[f"{'torchrun ' if t else ''}{s} {' '.join(a)}" for s, a, t in RUNS])
def test_each_documented_command_runs_at_a_reduced_size(tmp_path, script, args, torchrun):
    """The command in a fresh folder (what it writes stays there), torchrun's lines with 2 gloo processes: it
    must end with status 0 within 300 s, else its output is the failure."""
    from test_distributed import run_to_end
    if torchrun:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    else:
        launcher = [sys.executable] + (["-m"] if script.startswith("theory.") else [])
    target = str(ROOT / script) if script.endswith(".py") else script
    env = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1" if torchrun else "2"}
    run_to_end([*launcher, target, *args], target, env, cwd=tmp_path, timeout=300)


@pytest.mark.slow  # 15 s on 2 cores
def test_the_fsdp2_recipe_of_docs_scaling_runs_under_torchrun(tmp_path):
    """docs/scaling.md's recipe for a model that exists only in shards, copied into a file as a reader would
    and run as its first line says (2 gloo processes): it trains, prints the loss and L_reg, saves an adapter."""
    from test_distributed import run_to_end
    page = (ROOT / "docs" / "scaling.md").read_text()
    recipe = page.split("```python\n# fsdp_recipe.py", 1)[1].split("```", 1)[0]
    (tmp_path / "fsdp_recipe.py").write_text("# fsdp_recipe.py" + recipe)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = str(tmp_path / "fsdp_recipe.py")  # also what finds its processes, should they hang
    out = run_to_end([*launcher, script], script, {"PYTHONPATH": str(ROOT)}, cwd=tmp_path, timeout=300)
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("step ")] == ["step 0", "step 1", "step 2"]
    assert (tmp_path / "adapter.pt").exists()
