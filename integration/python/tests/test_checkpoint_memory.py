"""Host memory of a checkpoint through MDOptimizer with a state_dir (mdopt_save and
mdopt_load underneath): a process holding ~200 MB of optimizer state (md-adamw, 24 matrices
of 1024 x 1024 and their two moments) saves and loads it, and its peak resident size
(VmHWM) may grow by at most 48 MB in each, a quarter of the state: a save streams through a
1 MiB buffer, a load checks every chunk first and then copies one state array (4 MB here)
at a time. Loading the whole state into memory would grow it by the state's size."""
import os
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BOUND = 48 << 20


def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) << 10
    pytest.skip("no VmHWM in /proc/self/status")


def test_save_and_load_stay_within_one_array(tmp_path):
    from mdopt.torch import MDOptimizer
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(1024, 1024) * 0.03) for _ in range(24)]
    opt = MDOptimizer([{"params": params, "preset": "md-adamw", "lr": 1e-3}], threads=1,
                      state_dir=str(tmp_path))
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.mdopt.state_bytes()
    assert state > 180 << 20
    base = hwm()
    sd = opt.state_dict()
    saved = hwm() - base
    before = [p.detach().clone() for p in params]
    opt.step()  # changes the state, so the load has something to restore
    base = hwm()
    opt.load_state_dict(sd)
    loaded = hwm() - base
    print("state %.0f MB: peak grew by %.1f MB saving, %.1f MB loading (bound %.0f MB)"
          % (state / 2**20, saved / 2**20, loaded / 2**20, BOUND / 2**20))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    assert saved < BOUND and loaded < BOUND
