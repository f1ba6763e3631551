"""Every command the pages give runs as written: each command line of train_tiny.py, bench.py,
theory.comparison and the theory scripts in README.md, docs/ and theory/README.md, and each flag
quoted on its own after such a command, is parsed by that script's own argument parser, so that a
renamed or misspelt flag turns this red."""

import argparse
import copy
import pathlib
import re
import shlex

import pytest

import bench
import train_tiny
from theory import comparison

ROOT = pathlib.Path(__file__).parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "theory" / "README.md"]
SCRIPTS = {  # what a page names -> that script's parser
    "train_tiny.py": lambda: train_tiny.argument_parser(train_tiny.Config()),
    "bench.py": bench.argument_parser,
    "theory.comparison": lambda: comparison.argument_parser(comparison.Comparison()),
    **{f"theory.{name}": argparse.ArgumentParser for name in ("condition_number", "eq14", "fused_forward",
                                                             "gamma", "regularizer")},  # no flags
}
COMMAND = re.compile(r"(?:python3? (?:-m )?|torchrun (?:--\S+ )*(?:\d+ )?)(train_tiny\.py|bench\.py|theory\.\w+)"
                     r"((?: (?!#)[^`\n|]+)?)")
FLAGS = re.compile(r"`(--[a-z_]+(?: [^`]*)?)`")


def documented():
    """(page, script, argument list, whole) for every command line (whole=True), and for every flag quoted
    alone (whole=False), checked against the script named nearest to it in its section of the page."""
    found = []
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")  # a shell line continued with a backslash
        for section in re.split(r"\n(?=#+ )", text):
            commands = [(m.start(), m.group(1)) for m in COMMAND.finditer(section)]
            for m in COMMAND.finditer(section):
                args = m.group(2).split("#")[0].replace("...", "1e-3")  # "--lrs ..." stands for a list
                found.append((page.name, m.group(1), shlex.split(args), True))
            for m in FLAGS.finditer(section) if commands else ():
                script = min(commands, key=lambda c: abs(c[0] - m.start()))[1]
                found.append((page.name, script, shlex.split(m.group(1)), False))
    return found


CASES = documented()


def test_the_pages_give_commands_of_every_script():
    assert {script for _, script, _, _ in CASES} >= {"train_tiny.py", "bench.py", "theory.comparison",
                                                     "theory.regularizer"}


@pytest.mark.parametrize("page, script, args, whole", CASES, ids=[f"{p}:{s} {' '.join(a)}" for p, s, a, _ in CASES])
def test_each_documented_command_parses_with_its_scripts_own_parser(page, script, args, whole):
    parser = SCRIPTS[script]()
    if not whole:  # a flag quoted alone: the others a full command needs are not there
        parser = copy.deepcopy(parser)
        for action in parser._actions:
            action.required = False
    try:
        parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{page}: `{script} {' '.join(args)}` is not accepted by {script}'s argument parser")
