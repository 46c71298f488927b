"""Communicators: the ranks an optimizer shards its state over.

    comm = mdopt.comm.local()   # one process (what MDOptimizer uses by default)
    comm = mdopt.comm.mpi()     # every rank of MPI_COMM_WORLD, under mpirun; no mpi4py needed

A communicator must outlive the optimizers created on it (MDOptimizer keeps a reference).
"""

import ctypes

from . import _lib
from ._lib import lib


class Comm:
    """An mdopt_comm handle with its rank and size."""

    def __init__(self, handle, kind):
        self._handle = handle
        self.kind = kind
        rank, size = ctypes.c_int(), ctypes.c_int()
        _lib.check(lib.mdopt_comm_rank(handle, ctypes.byref(rank)), "mdopt_comm_rank")
        _lib.check(lib.mdopt_comm_size(handle, ctypes.byref(size)), "mdopt_comm_size")
        self.rank, self.size = rank.value, size.value

    @property
    def handle(self):
        if self._handle is None:
            raise ValueError("mdopt communicator was closed")
        return self._handle

    def close(self):
        """Frees the handle (after every optimizer on it); also done when collected."""
        if self._handle is not None:
            lib.mdopt_comm_destroy(self._handle)
            self._handle = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: the library may be gone already
            pass

    def __repr__(self):
        return "mdopt.comm.Comm(%s, rank=%d, size=%d)" % (self.kind, self.rank, self.size)


def local():
    """A single-process communicator: rank 0 of 1."""
    h = ctypes.c_void_p()
    _lib.check(lib.mdopt_comm_create_local(ctypes.byref(h)), "mdopt_comm_create_local")
    return Comm(h, "local")


def mpi(comm=None):
    """The ranks of an MPI communicator (mdopt_comm_create_mpi): `comm` None means
    MPI_COMM_WORLD; an mpi4py communicator is passed by its handle. Collective: every rank
    calls it. Initialises MPI (MPI_THREAD_MULTIPLE) if nobody has, and then finalises it at
    exit. mdopt works on a duplicate, so its messages never mix with the caller's."""
    h = ctypes.c_void_p()
    if comm is None:
        ptr = None
    else:
        try:
            from mpi4py import MPI  # only to read the handle of the caller's communicator
        except ImportError:
            raise TypeError("mdopt.comm.mpi(comm): comm must be None or an mpi4py "
                            "communicator (mpi4py is not importable)") from None
        if not isinstance(comm, MPI.Comm):
            raise TypeError("mdopt.comm.mpi(comm): comm must be None or an mpi4py "
                            "communicator, not %r" % type(comm).__name__)
        ptr = ctypes.c_void_p(MPI._addressof(comm))  # an MPI_Comm*
    _lib.check(lib.mdopt_comm_create_mpi(ptr, ctypes.byref(h)), "mdopt_comm_create_mpi")
    return Comm(h, "mpi")
