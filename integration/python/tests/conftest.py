"""Tests of the Python package against a libmdopt.so.1: $MDOPT_LIBRARY (ctest sets it to
its build's library), else the package's own search (the checkout's build/). The package
is imported from this checkout, not from an installed copy."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import torch
    # The models here are tiny: one thread avoids oversubscribing the cores that libmdopt's
    # own OpenMP threads (threads=1 in the tests) and other test processes use.
    torch.set_num_threads(1)
except ImportError:
    pass
