"""mdopt from Python: the Magnitude-Direction decoupled optimizer (libmdopt.so.1) through
its C ABI, with ctypes (nothing to compile).

    from mdopt.torch import MDOptimizer                 # a torch.optim.Optimizer
    from mdopt.recipes import param_groups, linear_decay

    opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), threads=2)

`mdopt.comm` has the communicators (local, mpi, torch_distributed); `MdoptError` is what a failed call
raises, carrying the status name and mdopt_last_error()'s message; `cuda_backend()` says
whether this library runs optimizers on CUDA GPUs (device=cuda:K).
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


def cuda_backend(device=0):
    """Whether this libmdopt takes device=cuda:<device>: (True, "") or (False, why).

    Asked of the library itself: an optimizer is created with that option and destroyed
    (nothing registered, nothing allocated on the GPU). A build without the CUDA backend
    refuses the option (MDOPT_UNSUPPORTED); `why` then carries the library's message and
    the `cuda` key of mdopt_runtime_info. True says the build has the backend; whether the
    GPU itself works shows when the first optimizer on it is finalized."""
    from . import _core
    info = dict(kv.split("=", 1) for kv in runtime_info().split() if "=" in kv)
    try:
        _core.Optimizer(comm.local(), "device=cuda:%d" % int(device)).destroy()
    except MdoptError as e:
        return False, "%s (%s; mdopt_runtime_info: cuda=%s)" % (
            e.message, e.status, info.get("cuda", "?"))
    return True, ""


__all__ = ["ABI_VERSION", "MdoptError", "comm", "cuda_backend", "library_path", "runtime_info",
           "version"]
