"""integration/tools/compare_torch.py, the benchmark against torch: it runs end to end on a
small model (every comparison it prints, its JSON), and its baselines compute what they
claim (the f32 Muon reference's Newton-Schulz against the same iteration in float64). Times
are not asserted: speed lives in the benchmark's output, not in tests."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")



def _cpu_fused_adamw():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    try:
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


pytestmark = pytest.mark.skipif(
    not _cpu_fused_adamw(), reason="this torch has no fused AdamW on the CPU (needs torch >= 2.4)")

from helpers import float64_ns  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TOOL = os.path.join(HERE, "..", "..", "tools", "compare_torch.py")


def load_tool():
    spec = importlib.util.spec_from_file_location("compare_torch", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("shape", [(32, 96), (96, 32)], ids=["wide", "tall"])
def test_f32_muon_reference_is_the_quintic_iteration(shape):
    tool = load_tool()
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    got = tool.TorchMuonF32.orthogonalize(g, 5).to(torch.float64)
    want = float64_ns(g, (3.4445, -4.7750, 2.0315), 5, 1e-7).to(torch.float64)
    err = ((got - want).norm() / want.norm()).item()
    print("compare_torch f32 NS vs float64, %s: %.3g" % (shape, err))
    assert err < 1e-5


def test_md_adamw_traffic_baseline_is_fused_adamw():
    """The floor row moves md-adamw's bytes but must compute exactly torch's AdamW."""
    tool = load_tool()
    gen = torch.Generator().manual_seed(4)
    a = [torch.nn.Parameter(torch.randn(16, 24, generator=gen))]
    a[0].grad = torch.randn(16, 24, generator=gen)
    b = [torch.nn.Parameter(a[0].detach().clone())]
    b[0].grad = a[0].grad.clone()
    floor = tool.TorchMdAdamwTraffic(a)
    ref = torch.optim.AdamW(b, lr=1e-3, weight_decay=0.1, fused=True)
    for _ in range(3):
        floor.step()
        ref.step()
    assert torch.equal(a[0], b[0])


def test_runs_end_to_end(tmp_path):
    out = tmp_path / "ct.json"
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, TOOL, "--d-model", "64", "--layers", "1", "--threads", "1",
         "--steps", "2", "--warmup", "0", "--repeat", "2", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=600)
    print(proc.stdout[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    labels = {r["step"] for r in res["rows"]}
    for want in ("torch AdamW(fused=True)", "mdopt md-adamw", "mdopt adamw",
                 "torch kernels, md-adamw's bytes", "torch Muon, f32 products",
                 "mdopt md-muon", "mdopt muon", "torch NS (f32 products)",
                 "mdopt NS (muon, momentum=0)"):
        assert want in labels, want
    for r in res["rows"]:
        assert r["ms"] > 0 and math.isfinite(r["ms"])
        if "ratio" in r:
            assert r["ratio"] > 0 and math.isfinite(r["ratio"])
    assert {r["repeat"] for r in res["rows"]} == {0, 1}
    assert res["copy_GBps"] > 0 and res["gemm_GFLOPps"] > 0
