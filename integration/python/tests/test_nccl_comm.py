"""mdopt.comm.nccl(): rank 0 makes the NCCL unique id through the C ABI, the process group
broadcasts it, every rank creates its communicator on its current CUDA device.

Everywhere (gloo groups of separate processes, no GPU needed): the id reaches every rank
byte for byte (zeros included) from the group's rank 0 alone, also in a sub-group whose
rank 0 is not global rank 0; rank 0's failure to make one (a build without NCCL) is the same
MdoptError on every rank; without torch.distributed initialised the call says so; and a
world of one either creates the communicator (a GPU and NCCL) or fails with the clear error
of what is missing (no NCCL in this build; no CUDA device). With a GPU: the communicator at
one rank (two ranks need two GPUs: NCCL refuses two ranks on one device)."""
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")
dist = pytest.importorskip("torch.distributed")

import mdopt  # noqa: E402
import mdopt.comm  # noqa: E402
from mdopt import MdoptError, _lib  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from nccl_comm_worker import FAKE_ID  # noqa: E402

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("this torch has no torch.distributed with gloo", allow_module_level=True)


def _run(case, world, tmp_path):
    """The worker's case on `world` gloo ranks; every rank's JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    store = str(tmp_path / "store")
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "nccl_comm_worker.py"), case,
                               str(r), str(world), store, str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    for r, p in enumerate(procs):
        assert p.returncode == 0, "rank %d of %s failed (%d):\n%s" % (r, case, p.returncode, outs[r])
    results = []
    for r in range(world):
        with open(tmp_path / ("rank%d.json" % r)) as f:
            results.append(json.load(f))
    return results


def _nccl_in_build():
    """Whether this libmdopt makes NCCL unique ids ("" when it does, else its message)."""
    buf = mdopt.comm.ctypes.create_string_buffer(_lib.NCCL_UNIQUE_ID_BYTES)
    if _lib.lib.mdopt_comm_nccl_unique_id(buf) == 0:
        return ""
    return _lib.last_error()


def test_without_torch_distributed_the_error_says_so():
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        mdopt.comm.nccl()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), 2e7])
def test_a_bad_creation_timeout_is_refused_before_anything_collective(bad):
    with pytest.raises(ValueError, match="timeout_s"):
        mdopt.comm.nccl(timeout_s=bad)


def test_the_creation_timeout_reaches_the_c_abi_checked_in_every_build():
    # mdopt_comm_create_nccl2 checks its arguments in every build (no NCCL needed): a bad
    # timeout is INVALID_ARGUMENT; a good one gets past the checks (UNSUPPORTED without NCCL).
    import ctypes
    h = ctypes.c_void_p()
    uid = bytes(_lib.NCCL_UNIQUE_ID_BYTES)
    st = _lib.lib.mdopt_comm_create_nccl2(uid, 1, 0, 0, -5.0, ctypes.byref(h))
    assert _lib.STATUS_NAMES[st] == "MDOPT_INVALID_ARGUMENT", _lib.last_error()
    assert "timeout" in _lib.last_error()


def test_the_id_reaches_every_rank_from_rank_0(tmp_path):
    res = _run("share", 3, tmp_path)
    for r, out in enumerate(res):
        assert "error" not in out, out
        assert bytes(out["id"]) == FAKE_ID, "rank %d got other bytes" % r
        assert out["made_id"] == ([0] if r == 0 else []), "only rank 0 makes the id"


def test_a_subgroups_rank_0_makes_the_id(tmp_path):
    res = _run("share_subgroup", 2, tmp_path)
    assert "error" not in res[1], res[1]
    assert bytes(res[1]["id"]) == FAKE_ID
    assert res[1]["made_id"] == [1] and res[0]["made_id"] == []


def test_rank_0s_failure_is_every_ranks(tmp_path):
    res = _run("share_error", 2, tmp_path)
    for out in res:
        kind, status, message = out["error"]
        assert kind == "MdoptError" and status == "MDOPT_UNSUPPORTED", out
        assert "rank 0 could not make the NCCL unique id" in message
        assert "no NCCL backend (test)" in message


def test_one_rank_creates_or_says_what_is_missing(tmp_path):
    (out,) = _run("create", 1, tmp_path)
    missing_nccl = _nccl_in_build()
    if missing_nccl:
        kind, status, message = out["error"]
        assert (kind, status) == ("MdoptError", "MDOPT_UNSUPPORTED"), out
        assert "rank 0 could not make the NCCL unique id" in message and "NCCL" in message
    elif not torch.cuda.is_available():
        kind, _, message = out["error"]
        assert kind == "RuntimeError", out
        assert "rank 0: no CUDA device visible to torch" in message
    else:
        assert "error" not in out, out
        assert out["comm"] == ["nccl(cuda:0)", 0, 1]


def test_on_a_gpu_an_optimizer_steps_over_it(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU visible to torch %s (torch.cuda.is_available() is False)"
                    % torch.__version__)
    why = _nccl_in_build()
    if why:
        pytest.skip("this libmdopt has no NCCL backend: %s" % why)
    (out,) = _run("optimizer", 1, tmp_path)
    assert "error" not in out, out
    assert out["comm"] == ["nccl(cuda:0)", 0, 1]
    assert out["moved"]
