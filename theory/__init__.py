"""Numerical checks of the paper's theorems and lemmas; see theory/README.md."""

import argparse

TINY_RUNS = dict(steps=2, pretrain_steps=10, test_size=8, batch_size=4)  # --quick's train_tiny runs


def argument_parser(doc):
    """The command line of a theory script: `python -m theory.NAME`, and --quick, the reduced size CI runs."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a reduced size that runs in seconds, to check that the script works; its numbers are "
                             "not the ones theory/README.md quotes")
    return parser


def quick_flag(doc):
    """Whether this command line asks for --quick; if so, says that the numbers are not the documented ones."""
    quick = argument_parser(doc).parse_args().quick
    if quick:
        print("--quick: reduced sizes, to check that the script runs; its numbers are not theory/README.md's")
    return quick
