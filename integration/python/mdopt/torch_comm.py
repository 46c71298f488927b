"""mdopt's collectives over a torch.distributed process group (mdopt_comm_create_callbacks).

    import torch.distributed as dist, mdopt.comm
    dist.init_process_group("gloo")               # under torchrun
    comm = mdopt.comm.torch_distributed()         # the default group; or group=<a subgroup>
    opt = mdopt.torch.MDOptimizer(model.parameters(), comm=comm, threads=1)

mdopt's buffers are host memory: the group must take CPU tensors (gloo; an MPI-backed
group works too). The callbacks wrap mdopt's buffers in tensors without copying where the
collective allows it and start every operation asynchronously (async_op=True); mdopt waits
each one (work.wait with comm_timeout_s) only when it needs the result, so gloo's threads
move the gradients while mdopt computes.

How each collective maps onto torch.distributed:
  all-reduce      all_reduce(SUM) in place (a copy first when send != recv)
  reduce-scatter  gloo has no reduce_scatter: all_reduce(SUM) of a copy of the whole send
                  buffer, then this rank's segment copied out. That moves about twice the
                  bytes of a real reduce-scatter; mdopt's bytes_sent still counts the
                  reduce-scatter's (docs/ABI.md)
  all-gather      all_gather into views of the output when every rank's count is the same,
                  else into segments padded to the largest count, copied out afterwards
  broadcast       broadcast from the group rank's global rank
  send/recv       batch_isend_irecv with mdopt's tag
  barrier         barrier
bf16 sums are taken in float32 and rounded once to bf16 (round to nearest even); data that
is only moved travels as bytes. mdopt divides means itself, so only sums are asked for.
"""

import ctypes
import datetime
import threading

import torch
import torch.distributed as dist

from . import _lib
from ._lib import lib

_SUCCESS = 0
_COMM_ERROR = 3
_INVALID_ARGUMENT = 1

# mdopt_comm_dtype (comm.h) -> (element size, torch dtype used for sums).
_F32, _BF16, _F64, _BYTES = 0, 1, 2, 3
_ESIZE = {_F32: 4, _BF16: 2, _F64: 8, _BYTES: 1}
_TORCH = {_F32: torch.float32, _BF16: torch.bfloat16, _F64: torch.float64, _BYTES: torch.uint8}


class P2P(ctypes.Structure):
    """mdopt_comm_p2p (comm.h); frozen layout."""

    _fields_ = [
        ("peer", ctypes.c_int32),
        ("is_send", ctypes.c_int32),
        ("data", ctypes.c_void_p),
        ("count", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
    ]


_P = ctypes.c_void_p
_PP = ctypes.POINTER(ctypes.c_void_p)
_I64P = ctypes.POINTER(ctypes.c_int64)
_ST = ctypes.c_int  # mdopt_status
ALL_REDUCE = ctypes.CFUNCTYPE(_ST, _P, _P, _P, ctypes.c_int64, ctypes.c_int32, _PP)
REDUCE_SCATTER = ctypes.CFUNCTYPE(_ST, _P, _P, _P, _I64P, ctypes.c_int32, _PP)
ALL_GATHER = ctypes.CFUNCTYPE(_ST, _P, _P, _P, _I64P, ctypes.c_int32, _PP)
BROADCAST = ctypes.CFUNCTYPE(_ST, _P, _P, ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, _PP)
SEND_RECV = ctypes.CFUNCTYPE(_ST, _P, ctypes.POINTER(P2P), ctypes.c_int64, ctypes.c_int32, _PP)
BARRIER = ctypes.CFUNCTYPE(_ST, _P, _PP)
WAIT = ctypes.CFUNCTYPE(_ST, _P, _P, ctypes.c_double)
TEST = ctypes.CFUNCTYPE(_ST, _P, _P, ctypes.POINTER(ctypes.c_int32))
SET_TIMEOUT = ctypes.CFUNCTYPE(None, _P, ctypes.c_double)
ABORT = ctypes.CFUNCTYPE(None, _P, ctypes.c_char_p)
ERROR_MESSAGE = ctypes.CFUNCTYPE(None, _P, _P, ctypes.c_size_t)
DESTROY = ctypes.CFUNCTYPE(None, _P)


class Callbacks(ctypes.Structure):
    """mdopt_comm_callbacks (comm.h), version 1."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("rank", ctypes.c_int32),
        ("size", ctypes.c_int32),
        ("user", ctypes.c_void_p),
        ("all_reduce", ALL_REDUCE),
        ("reduce_scatter", REDUCE_SCATTER),
        ("all_gather", ALL_GATHER),
        ("broadcast", BROADCAST),
        ("send_recv", SEND_RECV),
        ("barrier", BARRIER),
        ("wait", WAIT),
        ("test", TEST),
        ("set_timeout", SET_TIMEOUT),
        ("abort", ABORT),
        ("error_message", ERROR_MESSAGE),
        ("destroy", DESTROY),
    ]


lib.mdopt_comm_create_callbacks.restype = ctypes.c_int
lib.mdopt_comm_create_callbacks.argtypes = [ctypes.POINTER(Callbacks), ctypes.POINTER(_P)]


def _bytes_at(ptr, nbytes):
    """A uint8 tensor over mdopt's memory (no copy)."""
    if nbytes == 0 or not ptr:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(ptr), dtype=torch.uint8)


def _typed_at(ptr, count, dtype):
    return _bytes_at(ptr, count * _ESIZE[dtype]).view(_TORCH[dtype])


class TorchCallbacks:
    """The callbacks of one communicator over one process group. Holds the ctypes function
    objects (the C side keeps only their addresses) and every in-flight operation: the
    Work objects, the tensors over mdopt's buffers and what to do when they are done."""

    def __init__(self, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("mdopt.comm.torch_distributed: torch.distributed is not "
                               "initialised (call dist.init_process_group first, e.g. "
                               "under torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("mdopt.comm.torch_distributed: this process is not in the group")
        self.backend = str(dist.get_backend(group))
        self.timeout = datetime.timedelta(seconds=600)
        self.error = b""
        self.aborted = None
        self._pending = {}
        self._next = 1
        self._lock = threading.Lock()
        self.struct = Callbacks()
        self.struct.struct_size = ctypes.sizeof(Callbacks)
        self.struct.rank = self.rank
        self.struct.size = self.size
        self.struct.user = None
        self._fns = {}
        for name, ftype in (("all_reduce", ALL_REDUCE), ("reduce_scatter", REDUCE_SCATTER),
                            ("all_gather", ALL_GATHER), ("broadcast", BROADCAST),
                            ("send_recv", SEND_RECV), ("barrier", BARRIER), ("wait", WAIT),
                            ("test", TEST), ("set_timeout", SET_TIMEOUT), ("abort", ABORT),
                            ("error_message", ERROR_MESSAGE), ("destroy", DESTROY)):
            fn = ftype(getattr(self, "_cb_" + name))
            self._fns[name] = fn  # kept alive as long as this object
            setattr(self.struct, name, fn)

    # -- helpers -----------------------------------------------------------------------
    def _global(self, group_rank):
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def _guard(self, what, body):
        """Runs body; an exception becomes MDOPT_COMM_ERROR with its text for
        error_message (a ctypes callback must never raise: ctypes would print the
        exception and return 0, which mdopt would take for success)."""
        try:
            return body()
        except BaseException as e:  # noqa: BLE001 - everything must become a status
            try:
                self.error = ("torch.distributed (%s): %s: %s: %s"
                              % (self.backend, what, type(e).__name__, e)).encode(
                                  "utf-8", "replace")
            except BaseException:  # noqa: BLE001
                self.error = b"torch.distributed: an exception in a callback"
            return _COMM_ERROR

    def _park(self, pending, works, keep, finish=None):
        """Hands mdopt a handle for works (Work objects or None), keeping the tensors in
        keep alive, with finish run once they are all done."""
        with self._lock:
            h = self._next
            self._next += 1
            self._pending[h] = (works, keep, finish)
        pending[0] = h
        return _SUCCESS

    # -- the callbacks -----------------------------------------------------------------
    def _cb_all_reduce(self, user, send, recv, count, dtype, pending):
        def body():
            r = _typed_at(recv, count, dtype)
            if send != recv and count > 0:
                r.copy_(_typed_at(send, count, dtype))
            if dtype == _BF16:
                acc = r.float()
                w = dist.all_reduce(acc, group=self.group, async_op=True)
                return self._park(pending, [w], (r, acc), lambda: r.copy_(acc.to(torch.bfloat16)))
            w = dist.all_reduce(r, group=self.group, async_op=True)
            return self._park(pending, [w], (r,))
        return self._guard("all-reduce", body)

    def _cb_reduce_scatter(self, user, send, recv, counts, dtype, pending):
        def body():
            c = [counts[i] for i in range(self.size)]
            total = sum(c)
            off = sum(c[:self.rank])
            mine = c[self.rank]
            acc = _typed_at(send, total, dtype).clone()
            if dtype == _BF16:
                acc = acc.float()
            out = _typed_at(recv, mine, dtype)
            w = dist.all_reduce(acc, group=self.group, async_op=True)

            def finish():
                out.copy_(acc[off:off + mine].to(out.dtype))
            return self._park(pending, [w], (acc, out), finish)
        return self._guard("reduce-scatter", body)

    def _cb_all_gather(self, user, send, recv, counts, dtype, pending):
        def body():
            es = _ESIZE[dtype]
            c = [counts[i] * es for i in range(self.size)]  # in bytes
            out = _bytes_at(recv, sum(c))
            inp = _bytes_at(send, c[self.rank])
            if len(set(c)) == 1:
                parts = list(out.split(c[0])) if c[0] > 0 else [out[:0]] * self.size
                w = dist.all_gather(parts, inp, group=self.group, async_op=True)
                return self._park(pending, [w], (out, inp, parts))
            # Unequal counts: every segment padded to the largest, copied out when done.
            big = max(c)
            padded = torch.zeros(big, dtype=torch.uint8)
            padded[:c[self.rank]].copy_(inp)
            parts = [torch.empty(big, dtype=torch.uint8) for _ in range(self.size)]
            w = dist.all_gather(parts, padded, group=self.group, async_op=True)

            def finish():
                at = 0
                for r in range(self.size):
                    out[at:at + c[r]].copy_(parts[r][:c[r]])
                    at += c[r]
            return self._park(pending, [w], (out, padded, parts), finish)
        return self._guard("all-gather", body)

    def _cb_broadcast(self, user, data, count, dtype, root, pending):
        def body():
            t = _bytes_at(data, count * _ESIZE[dtype])
            w = dist.broadcast(t, src=self._global(root), group=self.group, async_op=True)
            return self._park(pending, [w], (t,))
        return self._guard("broadcast", body)

    def _cb_send_recv(self, user, ops, n_ops, tag, pending):
        def body():
            p2p, keep = [], []
            for k in range(n_ops):
                o = ops[k]
                t = _bytes_at(o.data, o.count * _ESIZE[o.dtype])
                keep.append(t)
                fn = dist.isend if o.is_send else dist.irecv
                p2p.append(dist.P2POp(fn, t, self._global(o.peer), self.group, tag))
            works = dist.batch_isend_irecv(p2p) if p2p else []
            return self._park(pending, works, keep)
        return self._guard("send/recv", body)

    def _cb_barrier(self, user, pending):
        def body():
            w = dist.barrier(group=self.group, async_op=True)
            return self._park(pending, [w], ())
        return self._guard("barrier", body)

    def _cb_wait(self, user, handle, timeout_s):
        def body():
            with self._lock:
                works, keep, finish = self._pending.pop(handle)
            timeout = datetime.timedelta(seconds=timeout_s)
            for w in works:
                if w is not None and w.wait(timeout) is False:
                    raise TimeoutError("not complete within %g s" % timeout_s)
            if finish is not None:
                finish()
            del keep
            return _SUCCESS
        return self._guard("wait", body)

    def _cb_test(self, user, handle, done):
        def body():
            with self._lock:
                works = self._pending[handle][0]
            done[0] = int(all(w is None or w.is_completed() for w in works))
            return _SUCCESS
        return self._guard("test", body)

    def _cb_set_timeout(self, user, timeout_s):
        self.timeout = datetime.timedelta(seconds=timeout_s)

    def _cb_abort(self, user, reason):
        # gloo cannot cancel work in flight; remember why, for messages.
        self.aborted = reason.decode("utf-8", "replace") if reason else ""

    def _cb_error_message(self, user, buf, size):
        if size == 0:
            return
        msg = self.error[:size - 1]
        ctypes.memmove(buf, msg, len(msg))
        ctypes.memset(buf + len(msg), 0, 1)

    def _cb_destroy(self, user):
        with self._lock:
            self._pending.clear()


def create(group=None):
    """Builds the mdopt_comm handle; returns (handle, callbacks), the callbacks object to
    be kept alive with the handle."""
    cbs = TorchCallbacks(group)
    h = ctypes.c_void_p()
    _lib.check(lib.mdopt_comm_create_callbacks(ctypes.byref(cbs.struct), ctypes.byref(h)),
               "mdopt_comm_create_callbacks")
    return h, cbs
