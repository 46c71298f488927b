"""mdopt from Python: the Magnitude-Direction decoupled optimizer (libmdopt.so.1) through
its C ABI, with ctypes (nothing to compile).

    from mdopt.torch import MDOptimizer                 # a torch.optim.Optimizer
    from mdopt.recipes import param_groups, linear_decay

    opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), threads=2)

`mdopt.comm` has the communicators (local, mpi); `MdoptError` is what a failed call
raises, carrying the status name and mdopt_last_error()'s message.
"""

from ._lib import ABI_VERSION, MdoptError
from ._lib import path as library_path
from . import comm

__version__ = "0.1.0"


def version():
    """The library's "major.minor.patch"."""
    from ._lib import lib
    return lib.mdopt_version_string().decode()


def runtime_info():
    """What the library runs on: one line of key=value (BLAS, ISA, threads, bf16, cuda)."""
    from ._lib import lib
    return lib.mdopt_runtime_info().decode()


__all__ = ["ABI_VERSION", "MdoptError", "comm", "library_path", "runtime_info", "version"]
