"""The test doubles (ThreadComm, NullComm, simulate) live in tests/_sim.py, where the tests import them; bench
scripts keep ``from sim import ...`` (their folder is on sys.path) through this module."""
import os
import sys

sys.path.append(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from _sim import NullComm, ThreadComm, simulate  # noqa: E402,F401

__all__ = ["NullComm", "ThreadComm", "simulate"]
