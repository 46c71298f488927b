"""Finds libmdopt.so.1 and declares the C ABI (include/mdopt/*.h) for ctypes.

Nothing here is compiled: the structs mirror the headers field for field, and every
versioned struct is filled in with struct_size = sizeof(the struct as declared here), which
the library accepts from any ABI-1 release on (docs/ABI.md, "Versioning").
"""

import ctypes
import os
import sys

ABI_VERSION = 1
SONAME = "libmdopt.so.%d" % ABI_VERSION

# mdopt_status values (status.h); stable ABI.
STATUS_NAMES = {
    0: "MDOPT_SUCCESS",
    1: "MDOPT_INVALID_ARGUMENT",
    2: "MDOPT_INVALID_STATE",
    3: "MDOPT_COMM_ERROR",
    4: "MDOPT_DEVICE_ERROR",
    5: "MDOPT_IO_ERROR",
    6: "MDOPT_UNSUPPORTED",
    7: "MDOPT_INTERNAL",
    8: "MDOPT_OUT_OF_MEMORY",
}

NCCL_UNIQUE_ID_BYTES = 128  # MDOPT_NCCL_UNIQUE_ID_BYTES (comm.h)

DTYPE_F32 = 0
DTYPE_BF16 = 1


class MdoptError(RuntimeError):
    """A failed mdopt_* call: `status` is the status name ("MDOPT_INVALID_ARGUMENT"),
    `message` what mdopt_last_error() said about it."""

    def __init__(self, status, message):
        self.status = status
        self.message = message
        super().__init__("%s: %s" % (status, message))

    def __reduce__(self):  # picklable (multiprocessing, pytest-xdist)
        return (MdoptError, (self.status, self.message))


class ParamDesc(ctypes.Structure):
    """mdopt_param_desc (optimizer.h)."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("name", ctypes.c_char_p),
        ("group", ctypes.c_char_p),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * 3),
        ("param_dtype", ctypes.c_int32),
        ("param", ctypes.c_void_p),
        ("grad_dtype", ctypes.c_int32),
        ("grad", ctypes.c_void_p),
        ("radius_scale", ctypes.c_double),  # since ABI 1 minor 4; 0 means 1
    ]


class StepInfo(ctypes.Structure):
    """mdopt_step_info (optimizer.h)."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("step", ctypes.c_int64),
        ("skipped", ctypes.c_int),
        ("grad_norm", ctypes.c_double),
        ("seconds", ctypes.c_double),
        ("exposed_comm_seconds", ctypes.c_double),
        ("comm_seconds", ctypes.c_double),
        ("bytes_sent", ctypes.c_int64),
    ]


class GroupStats(ctypes.Structure):
    """mdopt_group_stats (optimizer.h)."""

    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("matrices", ctypes.c_int64),
        ("orthogonalized", ctypes.c_int64),
        ("projected", ctypes.c_int64),
        ("gain_stepped", ctypes.c_int64),
        ("skipped", ctypes.c_int64),
        ("mean_relative_update", ctypes.c_double),
    ]


def init(struct_type):
    """The *_INIT initializer: struct_size = sizeof, every other field zero."""
    s = struct_type()
    s.struct_size = ctypes.sizeof(struct_type)
    return s


_P = ctypes.c_void_p
_S = ctypes.c_char_p
_I64P = ctypes.POINTER(ctypes.c_int64)
_DP = ctypes.POINTER(ctypes.c_double)

# name: (restype, argtypes). Every function returning mdopt_status returns c_int.
_SIGNATURES = {
    "mdopt_abi_version": (ctypes.c_int, []),
    "mdopt_version_string": (_S, []),
    "mdopt_runtime_info": (_S, []),
    "mdopt_status_string": (_S, [ctypes.c_int]),
    "mdopt_last_error": (_S, []),
    "mdopt_comm_create_local": (ctypes.c_int, [ctypes.POINTER(_P)]),
    "mdopt_comm_create_mpi": (ctypes.c_int, [_P, ctypes.POINTER(_P)]),
    "mdopt_comm_nccl_unique_id": (ctypes.c_int, [ctypes.c_char_p]),
    "mdopt_comm_create_nccl": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                              ctypes.c_int, ctypes.POINTER(_P)]),
    "mdopt_comm_create_nccl2": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_int, ctypes.c_double,
                                               ctypes.POINTER(_P)]),
    "mdopt_comm_rank": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int)]),
    "mdopt_comm_size": (ctypes.c_int, [_P, ctypes.POINTER(ctypes.c_int)]),
    "mdopt_comm_destroy": (ctypes.c_int, [_P]),
    "mdopt_comm_abort": (ctypes.c_int, [_P, _S]),
    "mdopt_create": (ctypes.c_int, [_P, _S, ctypes.POINTER(_P)]),
    "mdopt_add_group": (ctypes.c_int, [_P, _S, _S]),
    "mdopt_set_group_lr": (ctypes.c_int, [_P, _S, ctypes.c_double]),
    "mdopt_get_group_lr": (ctypes.c_int, [_P, _S, _DP, _DP]),
    "mdopt_set_group_hparam": (ctypes.c_int, [_P, _S, _S, ctypes.c_double]),
    "mdopt_get_group_hparam": (ctypes.c_int, [_P, _S, _S, _DP]),
    "mdopt_add_param": (ctypes.c_int, [_P, ctypes.POINTER(ParamDesc), _I64P]),
    "mdopt_set_pointers": (ctypes.c_int, [_P, ctypes.c_int64, _P, _P]),
    "mdopt_finalize": (ctypes.c_int, [_P]),
    "mdopt_step": (ctypes.c_int, [_P, ctypes.c_double, _P, ctypes.POINTER(StepInfo)]),
    "mdopt_grads_ready": (ctypes.c_int, [_P, ctypes.c_int64, ctypes.c_int64, _P]),
    "mdopt_gather_params": (ctypes.c_int, [_P, _P]),
    "mdopt_group_info": (ctypes.c_int, [_P, _S, ctypes.POINTER(GroupStats)]),
    "mdopt_save": (ctypes.c_int, [_P, _S]),
    "mdopt_load": (ctypes.c_int, [_P, _S]),
    "mdopt_state_bytes": (ctypes.c_int, [_P, _I64P]),
    "mdopt_workspace_bytes": (ctypes.c_int, [_P, _I64P]),
    "mdopt_get_state": (ctypes.c_int, [_P, ctypes.c_int64, _S, _DP, ctypes.c_int64, _I64P]),
    "mdopt_describe_plan": (ctypes.c_int, [_P, ctypes.c_char_p, ctypes.c_size_t,
                                           ctypes.POINTER(ctypes.c_size_t)]),
    "mdopt_destroy": (ctypes.c_int, [_P]),
}


def candidate_paths():
    """Where libmdopt.so.1 is looked for, in order (docs/integration.md):
    $MDOPT_LIBRARY (a file or a directory), a copy next to this package, lib/ under the
    Python prefix, /usr/local and /usr (cmake --install), $MDOPT_BUILD_DIR/dist_opt, the
    build tree (build/dist_opt) of the checkout this package sits in or was installed
    from, and last the dynamic loader's own search (LD_LIBRARY_PATH, ld.so.conf)."""
    out = []
    env = os.environ.get("MDOPT_LIBRARY")
    if env:
        out.append(os.path.join(env, SONAME) if os.path.isdir(env) else env)
    here = os.path.dirname(os.path.abspath(__file__))
    out.append(os.path.join(here, SONAME))
    multiarch = getattr(sys.implementation, "_multiarch", None)
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, "/usr/local", "/usr"]):
        out.append(os.path.join(prefix, "lib", SONAME))
        if multiarch:
            out.append(os.path.join(prefix, "lib", multiarch, SONAME))
    build = os.environ.get("MDOPT_BUILD_DIR")
    if build:
        out.append(os.path.join(build, "dist_opt", SONAME))
    # Run from the checkout (integration/python/mdopt/_lib.py: the root three levels up), or
    # installed from one (pip install integration/python records it in _checkout.py).
    roots = [os.path.normpath(os.path.join(here, "..", "..", ".."))]
    try:
        from . import _checkout
        roots.append(_checkout.ROOT)
    except ImportError:
        pass
    for root in dict.fromkeys(roots):
        if os.path.isfile(os.path.join(root, "include", "mdopt", "mdopt.h")):
            out.append(os.path.join(root, "build", "dist_opt", SONAME))
    out.append(SONAME)  # the loader's search path
    return out


def _load():
    env = os.environ.get("MDOPT_LIBRARY")
    if env:
        # Asked for one library: that one or an error, never a silent fallback elsewhere.
        path = os.path.join(env, SONAME) if os.path.isdir(env) else env
        if not os.path.exists(path):
            raise ImportError("mdopt: MDOPT_LIBRARY=%s, but %s does not exist; point it at "
                              "libmdopt.so.1 (or the folder holding it), or unset it to "
                              "search the usual places" % (env, path))
        try:
            return ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL), path
        except OSError as e:
            raise ImportError("mdopt: MDOPT_LIBRARY=%s: cannot load %s: %s"
                              % (env, path, e)) from None
    tried = []
    for path in candidate_paths():
        if os.sep in path and not os.path.exists(path):
            tried.append(path + " (absent)")
            continue
        try:
            # RTLD_GLOBAL: libmdopt pulls in libmpi, whose plug-ins (Open MPI's mca_*.so)
            # resolve MPI's own symbols globally; loaded locally they fail to open.
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            tried.append("%s (%s)" % (path, e))
            if path == os.environ.get("MDOPT_LIBRARY"):
                break
            continue
        return lib, path
    raise ImportError(
        "mdopt: cannot load %s; set MDOPT_LIBRARY to its path. Tried:\n  %s"
        % (SONAME, "\n  ".join(tried)))


lib, path = _load()
for _name, (_res, _args) in _SIGNATURES.items():
    try:
        _fn = getattr(lib, _name)
    except AttributeError:
        raise ImportError("mdopt: %s (%s) lacks %s: a library older than this package"
                          % (path, SONAME, _name)) from None
    _fn.restype = _res
    _fn.argtypes = _args

if lib.mdopt_abi_version() != ABI_VERSION:
    raise ImportError("mdopt: %s has ABI version %d, this package speaks %d"
                      % (path, lib.mdopt_abi_version(), ABI_VERSION))


def check(status, what=None):
    """Raises MdoptError unless status is MDOPT_SUCCESS."""
    if status == 0:
        return
    message = lib.mdopt_last_error().decode("utf-8", "replace")
    if what:
        message = "%s: %s" % (what, message) if message else what
    raise MdoptError(STATUS_NAMES.get(status, "MDOPT_UNKNOWN_STATUS(%d)" % status), message)


def last_error():
    return lib.mdopt_last_error().decode("utf-8", "replace")
