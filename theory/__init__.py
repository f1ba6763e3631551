"""Numerical checks of the paper's theorems and lemmas; see theory/README.md."""
