"""Two data-parallel ranks under torchrun, over a gloo process group
(mdopt.comm.torch_distributed: the callback communicator), train the same MLP as one
process does, in both shard layouts. Each rank's final weights must equal the one-process
reference (each rank's gradient computed in turn and averaged by hand, a local
communicator) within 5e-6 relative (the sharded step's tolerance; only the order of
float32 sums may differ), the ranks must agree bit for bit, and each must have sent bytes.
One thread per rank. (2 MPI ranks against one: test_mpi.py.)"""
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import dist_train  # noqa: E402

TOLERANCE = 5e-6


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.setdefault("OMP_WAIT_POLICY", "passive")
    return env


def _check(out, world, layouts):
    got = [torch.load(os.path.join(out, "rank%d.pt" % r)) for r in range(world)]
    for layout in layouts:
        ref = dist_train.train_reference(world, layout)
        worst = 0.0
        for r, g in enumerate(got):
            assert g["world"] == world and g["rank"] == r
            assert g["sent"][layout] > 0, "rank %d sent nothing: not sharded" % r
            for name, w in g["weights"][layout].items():
                err = ((w - ref[name]).abs().max() / ref[name].abs().max()).item()
                worst = max(worst, err)
                assert err <= TOLERANCE, "layout=%s, rank %d, %s: relative error %.3g" % (
                    layout, r, name, err)
                assert torch.equal(w, got[0]["weights"][layout][name]), "ranks differ on %s" % name
        print("%d ranks (layout=%s) vs one process: worst relative error %.3g"
              % (world, layout, worst))


def _run(cmd, timeout=300):
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, "%s failed (%d):\n%s\n%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr)


def test_torchrun_gloo_two_ranks_equal_one(tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          os.path.join(HERE, "dist_train.py"), "--comm", "torch", "--out", str(tmp_path)])
    _check(str(tmp_path), 2, ["rows", "owner"])


def test_torchrun_gloo_timeout_is_comm_error(tmp_path):
    """A rank that never joins: the other's step fails within comm_timeout_s with
    MDOPT_COMM_ERROR naming the timeout, and the next step fails at once."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          os.path.join(HERE, "dist_train.py"), "--comm", "torch", "--stall", "--out", str(tmp_path)])
    r = torch.load(os.path.join(str(tmp_path), "stall.pt"))
    status, message = r["first"]
    assert status == "MDOPT_COMM_ERROR", r
    assert "comm_timeout_s = 2" in message and "callback communicator rank 0 of 2" in message, r
    assert r["seconds"] < 10, r
    # The next step fails at once: either on the request that failed (the step had left
    # its reduce-scatter in flight, and a request reports how it ended again) or on the
    # broken communicator; never by waiting for the transport again.
    status, message = r["second"]
    assert status == "MDOPT_COMM_ERROR" and ("broken" in message or "comm_timeout_s" in message), r
    assert r["second_seconds"] < 1, r
