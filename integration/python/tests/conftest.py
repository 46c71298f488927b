"""Tests of the Python package against a libmdopt.so.1: $MDOPT_LIBRARY (ctest sets it to
its build's library), else the package's own search (the checkout's build/). The package
is imported from this checkout, not from an installed copy."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
