"""Benchmarks (``python -m lowbit.bench.<name>``). Not tests: they print ratios and write JSON to ``results/``.

Importing this package sets OpenMP's thread waiting before any bench module imports torch (the package is imported
first): ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (on a shared machine spinning OpenMP threads
steal each other's cores); ``OMP_WAIT_POLICY=default`` removes the variable, leaving OpenMP's own default (spin a
while, then sleep), which is what a user's process gets.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if os.environ["OMP_WAIT_POLICY"] == "default":
    del os.environ["OMP_WAIT_POLICY"]
