"""A thin object over one mdopt_optimizer: the C ABI with Python types and exceptions,
independent of any framework (MDOptimizer in mdopt.torch builds on it)."""

import collections
import ctypes

from . import _lib
from ._lib import lib

StepResult = collections.namedtuple(
    "StepResult", "step skipped grad_norm seconds exposed_comm_seconds comm_seconds "
    "bytes_sent message")
StepResult.__doc__ = """What one step did (mdopt_step_info): `step` steps taken so far
(skipped ones excluded), `skipped` True when a NaN/Inf gradient skipped it (`message` names
the parameter), `grad_norm` the global L2 norm of the (mean) gradients, `seconds` the wall
time of the call, `comm_seconds` / `exposed_comm_seconds` / `bytes_sent` this rank's
communication (zero on one rank)."""

GroupStats = collections.namedtuple(
    "GroupStats", "matrices orthogonalized projected gain_stepped skipped mean_relative_update")
GroupStats.__doc__ = """What the last step did to a group's matrices (mdopt_group_info)."""


def _b(s):
    return s.encode("utf-8") if isinstance(s, str) else s


def _stream(stream):
    """A stream argument as ctypes passes it: None (NULL) or the handle's address."""
    if stream is None or stream == 0:
        return None
    return ctypes.c_void_p(int(stream))


class Optimizer:
    """One mdopt_optimizer on a communicator. Methods mirror the C calls; a failed call
    raises MdoptError and leaves the optimizer as it was."""

    def __init__(self, comm, options=""):
        self.comm = comm  # kept alive as long as the optimizer
        h = ctypes.c_void_p()
        _lib.check(lib.mdopt_create(comm.handle, _b(options), ctypes.byref(h)),
                   "mdopt_create(options=%r)" % options)
        self._h = h

    @property
    def handle(self):
        if self._h is None:
            raise ValueError("mdopt optimizer was destroyed")
        return self._h

    def add_group(self, name, spec):
        _lib.check(lib.mdopt_add_group(self.handle, _b(name), _b(spec)))

    def set_group_lr(self, name, lr):
        _lib.check(lib.mdopt_set_group_lr(self.handle, _b(name), float(lr)))

    def set_group_hparam(self, name, key, value):
        """mdopt_set_group_hparam: beta1, beta2, eps, momentum, weight_decay (or lr)."""
        _lib.check(lib.mdopt_set_group_hparam(self.handle, _b(name), _b(key), float(value)))

    def group_hparam(self, name, key):
        """mdopt_get_group_hparam: lr, gain_lr, beta1, beta2, eps, momentum, weight_decay."""
        v = ctypes.c_double()
        _lib.check(lib.mdopt_get_group_hparam(self.handle, _b(name), _b(key), ctypes.byref(v)))
        return v.value

    def group_lr(self, name):
        """(lr, gain_lr) of a group now."""
        lr, gain_lr = ctypes.c_double(), ctypes.c_double()
        _lib.check(lib.mdopt_get_group_lr(self.handle, _b(name), ctypes.byref(lr),
                                          ctypes.byref(gain_lr)))
        return lr.value, gain_lr.value

    def add_param(self, name, group, shape, dtype, param_ptr, grad_dtype, grad_ptr=None,
                  radius_scale=0.0):
        d = _lib.init(_lib.ParamDesc)
        d.radius_scale = radius_scale
        d.name, d.group = _b(name), _b(group)
        d.ndim = len(shape)
        for k, s in enumerate(shape):
            d.shape[k] = s
        d.param_dtype, d.param = dtype, param_ptr
        d.grad_dtype, d.grad = grad_dtype, grad_ptr
        index = ctypes.c_int64()
        _lib.check(lib.mdopt_add_param(self.handle, ctypes.byref(d), ctypes.byref(index)))
        return index.value

    def set_pointers(self, index, param_ptr, grad_ptr):
        _lib.check(lib.mdopt_set_pointers(self.handle, index, param_ptr, grad_ptr))

    def finalize(self):
        _lib.check(lib.mdopt_finalize(self.handle))

    def step(self, lr_scale=1.0, stream=None, info=True):
        """mdopt_step. `stream`: a cudaStream_t as an int (torch's Stream.cuda_stream) for
        device=cuda:K, None on the CPU (and for CUDA's legacy default stream). With
        info=False no mdopt_step_info is passed: a device backend then returns with the
        step still queued on the stream (no host wait) and this returns None."""
        if not info:
            _lib.check(lib.mdopt_step(self.handle, float(lr_scale), _stream(stream), None))
            return None
        out = _lib.init(_lib.StepInfo)
        _lib.check(lib.mdopt_step(self.handle, float(lr_scale), _stream(stream),
                                  ctypes.byref(out)))
        message = _lib.last_error() if out.skipped else ""
        return StepResult(out.step, bool(out.skipped), out.grad_norm, out.seconds,
                          out.exposed_comm_seconds, out.comm_seconds, out.bytes_sent,
                          message)

    def grads_ready(self, first, count=1, stream=None):
        _lib.check(lib.mdopt_grads_ready(self.handle, first, count, _stream(stream)))

    def gather_params(self, stream=None):
        _lib.check(lib.mdopt_gather_params(self.handle, _stream(stream)))

    def group_info(self, name):
        s = _lib.init(_lib.GroupStats)
        _lib.check(lib.mdopt_group_info(self.handle, _b(name), ctypes.byref(s)))
        return GroupStats(s.matrices, s.orthogonalized, s.projected, s.gain_stepped,
                          s.skipped, s.mean_relative_update)

    def save(self, directory):
        _lib.check(lib.mdopt_save(self.handle, _b(str(directory))))

    def load(self, directory):
        _lib.check(lib.mdopt_load(self.handle, _b(str(directory))))

    def state_bytes(self):
        b = ctypes.c_int64()
        _lib.check(lib.mdopt_state_bytes(self.handle, ctypes.byref(b)))
        return b.value

    def workspace_bytes(self):
        b = ctypes.c_int64()
        _lib.check(lib.mdopt_workspace_bytes(self.handle, ctypes.byref(b)))
        return b.value

    def get_state(self, index, field):
        """One part of a parameter's state as a list of floats (mdopt_get_state)."""
        n = ctypes.c_int64()
        _lib.check(lib.mdopt_get_state(self.handle, index, _b(field), None, 0, ctypes.byref(n)))
        buf = (ctypes.c_double * n.value)()
        _lib.check(lib.mdopt_get_state(self.handle, index, _b(field), buf, n.value, None))
        return list(buf)

    def describe_plan(self):
        need = ctypes.c_size_t()
        _lib.check(lib.mdopt_describe_plan(self.handle, None, 0, ctypes.byref(need)))
        buf = ctypes.create_string_buffer(need.value)
        _lib.check(lib.mdopt_describe_plan(self.handle, buf, need.value, None))
        return buf.value.decode("utf-8")

    def destroy(self):
        if self._h is not None:
            lib.mdopt_destroy(self._h)
            self._h = None

    def __del__(self):
        try:
            self.destroy()
        except Exception:
            pass
