"""Two data-parallel ranks train the same MLP as one process does: under torchrun over a
gloo process group (mdopt.comm.torch_distributed, the callback communicator) and under
mpirun (mdopt.comm.mpi). Each rank's final weights must equal the one-process reference
(each rank's gradient computed in turn and averaged by hand, a local communicator) within
5e-6 relative (the sharded step's tolerance; only the order of float32 sums differs), and
the ranks must agree bit for bit. One thread per rank."""
import os
import shutil
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
    if p.returncode != 0 and "MDOPT_UNSUPPORTED" in p.stderr:
        pytest.skip("this libmdopt has no MPI backend")
    assert p.returncode == 0, "%s failed (%d):\n%s\n%s" % (" ".join(cmd), p.returncode, p.stdout, p.stderr)


def test_torchrun_gloo_two_ranks_equal_one(tmp_path):
    pytest.importorskip("torch.distributed")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("this torch has no gloo backend")
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
          os.path.join(HERE, "dist_train.py"), "--comm", "torch", "--out", str(tmp_path)])
    _check(str(tmp_path), 2, ["rows", "owner"])


def test_mpirun_two_ranks_equal_one(tmp_path):
    mpirun = shutil.which("mpirun")
    if mpirun is None:
        pytest.skip("no mpirun on PATH")
    cmd = [mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    if "MDOPT_LIBRARY" in os.environ:
        cmd += ["-x", "MDOPT_LIBRARY"]
    _run(cmd + [sys.executable, os.path.join(HERE, "dist_train.py"), "--comm", "mpi",
                "--out", str(tmp_path)])
    _check(str(tmp_path), 2, ["rows", "owner"])
