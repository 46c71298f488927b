"""Sharded checkpoints through the Python front ends, under mpirun (threads=1 per rank).

Each front end (MDOptimizer; the Megatron-Core adapter) trains, saves at N ranks into a
directory, loads at M ranks and trains on; the final weights must match an uninterrupted
one-rank run within 1e-5 relative (the multi-rank tolerance of test_mpi.py). MDOptimizer
runs a chain 4 -> 2 -> 3 -> 1 and a 2 -> 2 load; the adapter 4 -> 2. Every save at 4
ranks must leave exactly four rank files. Every load runs under an LD_PRELOAD shim
(open_trace.c) that logs each process's opens: a rank must open exactly the rank files
holding rows it holds after the load (computed here from the saved manifest's plan and the
loading rank's plan), at the same world size its own file alone. The state_dict must be a
reference of a few hundred bytes, never state."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")

from test_mpi import mpiexec  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler (cc) to build the open-tracing shim")
    so = str(tmp_path_factory.mktemp("shim") / "open_trace.so")
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", so, os.path.join(HERE, "open_trace.c"),
                    "-ldl"], check=True)
    return so


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(np, front, mode, steps, ckdir, src, out, shim=None, trace=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="passive")
    cmd = mpiexec() + ["-np", str(np)]
    if shim:
        os.makedirs(trace, exist_ok=True)
        env.update(LD_PRELOAD=shim, MDOPT_OPEN_LOG=trace)
        cmd += ["-x", "LD_PRELOAD", "-x", "MDOPT_OPEN_LOG"]
    cmd += [sys.executable, os.path.join(HERE, "ckpt_worker.py"), front, mode, str(steps),
            str(ckdir), str(src), str(out), _port()]
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    print("%s %s at %d ranks: %.1f s" % (front, mode, np, time.time() - t0))
    if r.returncode == 77 or "has no MPI communicator" in r.stdout:
        pytest.skip("libmdopt was built without MPI (MDOPT_MPI=OFF or MPI not found)")
    assert r.returncode == 0, "mpirun %s failed:\n%s\n%s" % (cmd, r.stdout, r.stderr[-6000:])
    return torch.load(str(out), weights_only=False)


def rows(slot, r):
    """[begin, end) of the rows rank r holds of a slot (dist_opt/shard_plan.cc)."""
    if slot["layout"] == "owner":
        return (0, slot["m"]) if r == slot["owner"] else (slot["m"], slot["m"])
    b = slot["block_rows"]
    return min(slot["m"], b * r), min(slot["m"], b * (r + 1))


def check_opens(ckdir, out, np, trace, part=0):
    """Each loading rank opened exactly the saved rank files holding rows it now holds
    (part 1: the opens after the worker's same-size marker, part 0: those before)."""
    manifest = json.load(open(os.path.join(ckdir, "manifest.json")))
    old = manifest["plan"]["slots"]
    names = {f["name"]: int(f["rank"]) for f in manifest["rank_files"]}
    for r in range(np):
        mine = json.load(open("%s.rank%d.json" % (out, r)))
        new = mine["plan"]["slots"]
        assert len(new) == len(old)
        want = set()
        for a, b in zip(old, new):
            lo, hi = rows(b, r)
            for q in range(manifest["world_size"]):
                qlo, qhi = rows(a, q)
                if max(lo, qlo) < min(hi, qhi):
                    want.add(q)
        log = os.path.join(trace, "open.%d.log" % mine["pid"])
        paths = (open(log).read().split("MARK-same-size-load\n") + [""])[part].split()
        opened = {names[os.path.basename(p)] for p in paths if os.path.basename(p) in names}
        assert opened == want, "rank %d of %d opened the files of ranks %s, holds rows of %s" % (
            r, np, sorted(opened), sorted(want))
        if np == manifest["world_size"]:
            assert opened == {r}
    return manifest


def rel_err(a, b):
    return max(((x.double() - y.double()).abs().max() / y.double().abs().max()).item()
                for x, y in zip(a, b))


def rank_files(d):
    return sorted(f for f in os.listdir(d) if f.startswith("rank-") and f.endswith(".state"))


def one_rank(steps):
    """The uninterrupted run of ckpt_worker.py's torch leg, in this process at one rank."""
    sys.path.insert(0, os.path.dirname(HERE))
    from helpers import mlp, train
    from mdopt.recipes import param_groups
    from mdopt.torch import MDOptimizer
    model = mlp(21)
    opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), threads=1)
    train(model, opt, steps)
    return {"weights": [p.detach().clone() for p in model.parameters()]}


def test_mdoptimizer_chain(tmp_path, shim):
    """4 -> 2 -> 3 -> 1, two steps per leg, against 8 steps at one rank; the 2-rank leg
    also reloads its own save at 2 ranks (each rank opening its own file alone)."""
    t = tmp_path
    legs = [(4, "save", None, "a"), (2, "loadsave", "a", "b"), (3, "loadsave", "b", "c")]
    for k, (np, mode, src, dst) in enumerate(legs):
        got = run(np, "torch", mode, 2, t / dst, t / ("%s.pt" % src) if src else "-",
                  t / ("%s.pt" % dst), shim if src else None, t / ("trace%d" % k))
        if src:
            m = check_opens(t / src, t / ("%s.pt" % dst), np, t / ("trace%d" % k))
            print("loaded a %d-rank save at %d ranks" % (m["world_size"], np))
            check_opens(t / dst, t / ("%s.pt" % dst), np, t / ("trace%d" % k), part=1)
        assert len(rank_files(t / dst)) == np
        sd = got["saved"]["opt"]
        assert sd["mdopt"]["checkpoint"]["world_size"] == np
        assert len(repr(sd["mdopt"])) < 2000  # a reference, not the state
    # The last leg at one rank, in this process.
    sys.path.insert(0, os.path.dirname(HERE))
    from helpers import mlp, train
    from mdopt.recipes import param_groups
    from mdopt.torch import MDOptimizer
    model = mlp(77)
    opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), threads=1)
    opt.load_state_dict(got["saved"]["opt"])
    train(model, opt, 2, seed=106)
    assert opt.last_step.step == 8
    err = rel_err([p.detach() for p in model.parameters()], one_rank(8)["weights"])
    print("MDOptimizer 4 -> 2 -> 3 -> 1 vs one rank, 8 steps: max rel error %.3g" % err)
    assert err < TOLERANCE


def test_mdoptimizer_stale_reference_refused(tmp_path):
    """A second save into the directory replaces the first; the first's reference is then
    refused, and the optimizer keeps its state."""
    sys.path.insert(0, os.path.dirname(HERE))
    from helpers import mlp, train
    from mdopt.recipes import param_groups
    from mdopt.torch import MDOptimizer
    model = mlp(3)
    opt = MDOptimizer(param_groups(model, lr=0.02), threads=1, state_dir=str(tmp_path))
    train(model, opt, 1)
    first = opt.state_dict()
    train(model, opt, 1)
    second = opt.state_dict()
    assert len(rank_files(tmp_path)) == 1
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="another save"):
        opt.load_state_dict(first)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.load_state_dict(second)
    assert opt.mdopt.step(1.0).step == 3


def test_megatron_four_to_two(tmp_path, shim):
    """Saved at 4 data-parallel ranks (which then go on without stopping), loaded at 2."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    t = tmp_path
    saved = run(4, "megatron", "save", 2, t / "m", "-", t / "m.pt")
    assert len(rank_files(t / "m")) == 4
    got = run(2, "megatron", "load", 2, "-", t / "m.pt", t / "end.pt", shim, t / "trace")
    check_opens(t / "m", t / "end.pt", 2, t / "trace")
    assert got["step"] == saved["step"] == 4
    err = rel_err(got["weights"], saved["saved"]["continued"])
    print("Megatron adapter 4 -> 2 vs 4 ranks uninterrupted, 4 steps: max rel error %.3g" % err)
    assert err < TOLERANCE
