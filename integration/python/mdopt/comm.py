"""Communicators: the ranks an optimizer shards its state over.

    comm = mdopt.comm.local()   # one process (what MDOptimizer uses by default)
    comm = mdopt.comm.mpi()     # every rank of MPI_COMM_WORLD, under mpirun; no mpi4py needed
    comm = mdopt.comm.torch_distributed()  # a torch.distributed group (gloo), under torchrun
    comm = mdopt.comm.nccl()    # NCCL on each rank's current CUDA device, bootstrapped over a
                                # torch.distributed group (under torchrun)

A communicator must outlive the optimizers created on it (MDOptimizer keeps a reference).
"""

import ctypes

from . import _lib
from ._lib import MdoptError, lib


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

    def abort(self, reason=""):
        """Aborts the communicator (mdopt_comm_abort), from any thread, without blocking: a
        watchdog's way out of a hung collective. Every wait on it returns at once with
        MDOPT_COMM_ERROR, and every optimizer on it refuses later steps, naming `reason`.
        Cannot be undone: the job should end."""
        _lib.check(lib.mdopt_comm_abort(self.handle, str(reason).encode()), "mdopt_comm_abort")

    def close(self):
        """Frees the handle; also done when collected. Optimizers created on it keep the
        communicator itself alive until they are destroyed."""
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


def torch_distributed(group=None):
    """The ranks of a torch.distributed process group (None: the default group), e.g. under
    torchrun after dist.init_process_group("gloo"): mdopt's collectives run as callbacks
    on that group (mdopt_comm_create_callbacks; mdopt/torch_comm.py says how each maps onto
    gloo; gloo has no reduce-scatter, so an all-reduce stands in for it). The group must
    take CPU tensors. Not collective by itself; the returned Comm keeps the callbacks
    alive."""
    from . import torch_comm  # imports torch only when asked for
    handle, callbacks = torch_comm.create(group)
    c = Comm(handle, "torch.distributed(%s)" % callbacks.backend)
    c._callbacks = callbacks  # the C side holds only the function pointers' addresses
    return c


def _make_nccl_id():
    """A fresh ncclUniqueId, 128 bytes (mdopt_comm_nccl_unique_id); MdoptError
    (MDOPT_UNSUPPORTED) in a build without NCCL."""
    buf = ctypes.create_string_buffer(_lib.NCCL_UNIQUE_ID_BYTES)
    _lib.check(lib.mdopt_comm_nccl_unique_id(buf), "mdopt_comm_nccl_unique_id")
    return buf.raw


def _share_nccl_id(group=None, make_id=_make_nccl_id):
    """Rank 0 of `group` makes the unique id and broadcasts it over the group
    (torch.distributed.broadcast_object_list); every rank returns the same 128 bytes. When
    rank 0 cannot make one, every rank raises the MdoptError it got, so that no rank waits
    for an id that never comes. Collective over the group."""
    import torch.distributed as dist
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("mdopt.comm.nccl: this process is not a member of the process group")
    payload = [None]
    if rank == 0:
        try:
            payload[0] = ("id", bytes(make_id()))
        except MdoptError as e:
            payload[0] = ("error", e.status, e.message)
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(payload, src=src, group=group)
    if payload[0][0] == "error":
        raise MdoptError(payload[0][1], "mdopt.comm.nccl: rank 0 could not make the NCCL "
                         "unique id: %s" % payload[0][2])
    uid = payload[0][1]
    if len(uid) != _lib.NCCL_UNIQUE_ID_BYTES:
        raise ValueError("mdopt.comm.nccl: the unique id has %d bytes, not %d"
                         % (len(uid), _lib.NCCL_UNIQUE_ID_BYTES))
    return uid


def nccl(process_group=None, timeout_s=600.0):
    """An NCCL communicator over the ranks of a torch.distributed process group (None: the
    default group), each rank on torch.cuda.current_device() (set it first, e.g.
    torch.cuda.set_device(local_rank) under torchrun). Collective: every rank of the group
    calls it. Rank 0 makes the NCCL unique id through the C ABI and the group broadcasts it
    (any backend: gloo or nccl); then every rank checks that it has a CUDA device, the ranks
    agree that all do, and each creates its rank (mdopt_comm_create_nccl2; the ranks must
    all join within `timeout_s` seconds, else the NCCL communicator is aborted and every
    rank gets MdoptError(MDOPT_COMM_ERROR)).

    Errors, the same on every rank: RuntimeError when torch.distributed is not available or
    not initialised, or a rank sees no CUDA device; MdoptError(MDOPT_UNSUPPORTED) when this
    libmdopt has no NCCL backend; ValueError for a timeout_s that is not a finite number in
    (0, 1e7] (checked before anything is collective)."""
    import math
    timeout_s = float(timeout_s)
    if not (math.isfinite(timeout_s) and 0.0 < timeout_s <= 1e7):
        raise ValueError("mdopt.comm.nccl: timeout_s=%r is not a finite number of seconds in "
                         "(0, 1e7]" % timeout_s)
    import torch
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "mdopt.comm.nccl: torch.distributed is not initialised: call "
            "torch.distributed.init_process_group first (e.g. under torchrun); it carries the "
            "NCCL unique id from rank 0 to the others")
    uid = _share_nccl_id(process_group)
    rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
    problem = None
    if not torch.cuda.is_available():
        problem = ("no CUDA device visible to torch %s (torch.cuda.is_available() is False)"
                   % torch.__version__)
    problems = [None] * size
    dist.all_gather_object(problems, problem, group=process_group)
    bad = ["rank %d: %s" % (r, p) for r, p in enumerate(problems) if p]
    if bad:
        raise RuntimeError("mdopt.comm.nccl: " + "; ".join(bad))
    device = torch.cuda.current_device()
    h = ctypes.c_void_p()
    # The id's 128 bytes are the mdopt_nccl_id struct's whole layout.
    _lib.check(lib.mdopt_comm_create_nccl2(uid, size, rank, device, timeout_s, ctypes.byref(h)),
               "mdopt_comm_create_nccl2")
    return Comm(h, "nccl(cuda:%d)" % device)
