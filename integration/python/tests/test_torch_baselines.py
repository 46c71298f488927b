"""MDOptimizer against torch's own optimizers on a small MLP, float32 on the CPU.

adamw: torch.optim.AdamW is the same algorithm (decoupled decay lr*wd, bias-corrected
moments, eps outside the square root); the difference is float32 rounding of the order of
operations: bound 1e-5 relative (measured ~3e-7) after 20 steps.

muon with ns_coeffs=jordan: torch.optim.Muon keeps buf = mu*buf + (1-mu)*g and the lerp form
of Nesterov, (1-mu) times mdopt's buffer and update, a factor Newton-Schulz's normalisation
removes; its default adjust_lr_fn ("original", max(1, sqrt(A/B))) is mdopt's muon_scale=max1;
weight decay multiplies by 1 - lr*wd with the unadjusted lr in both; torch casts the NS
input to bfloat16. With torch's NS replaced by the same iteration in float64, the two agree
to float32 rounding (bound 2e-5 relative, measured in the test output); with torch's own
bf16 NS, to bf16 accuracy: the distance between the two runs is a small fraction of how far
the weights moved (bound 5%)."""
import copy

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")

from helpers import batch, float64_ns, mlp, rel_err, train  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402


def adamw_pair(sched):
    model = mlp(1)
    ref = copy.deepcopy(model)
    opt = MDOptimizer(model.parameters(), preset="adamw", lr=3e-3, betas=(0.9, 0.95),
                      eps=1e-8, weight_decay=0.1, threads=1)
    tor = torch.optim.AdamW(ref.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    s1 = s2 = None
    if sched:
        s1 = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 - t / 25.0)
        s2 = torch.optim.lr_scheduler.LambdaLR(tor, lambda t: 1.0 - t / 25.0)
    return model, opt, s1, ref, tor, s2


@pytest.mark.parametrize("sched", [False, True], ids=["constant", "lambda_lr"])
def test_adamw_equals_torch_adamw(sched):
    model, opt, s1, ref, tor, s2 = adamw_pair(sched)
    start = copy.deepcopy(model)
    train(model, opt, 20, s1)
    train(ref, tor, 20, s2)
    err = rel_err(model, ref)
    print("adamw vs torch.optim.AdamW, 20 steps, %s: max rel error %.3g (moved %.3g)"
          % ("LambdaLR" if sched else "constant lr", err, rel_err(ref, start)))
    assert err < 1e-5
    assert rel_err(ref, start) > 1e-2  # the weights did move
    if sched:
        assert opt.param_groups[0]["lr"] == pytest.approx(3e-3 * (1 - 20 / 25.0))
    assert opt.last_step.step == 20 and not opt.last_step.skipped


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="this torch has no torch.optim.Muon")
@pytest.mark.parametrize("ns", ["float64", "torch_bf16"])
def test_muon_jordan_equals_torch_muon(ns, monkeypatch):
    model = mlp(2, bias=False)
    ref = copy.deepcopy(model)
    start = copy.deepcopy(model)
    opt = MDOptimizer(model.parameters(), preset="muon", ns_coeffs="jordan", lr=0.02,
                      momentum=0.95, nesterov=True, weight_decay=0.1, threads=1)
    tor = torch.optim.Muon(ref.parameters(), lr=0.02, momentum=0.95, nesterov=True,
                           weight_decay=0.1)
    if ns == "float64":
        import torch.optim._muon as muon_impl
        monkeypatch.setattr(muon_impl, "_zeropower_via_newtonschulz", float64_ns)
    train(model, opt, 20)
    train(ref, tor, 20)
    err = rel_err(model, ref)
    moved = max(((a - b).norm() / (b - c).norm()).item()
                for a, b, c in zip(model.parameters(), ref.parameters(), start.parameters()))
    print("muon(jordan) vs torch.optim.Muon, NS %s, 20 steps: max rel error %.3g, "
          "distance / displacement %.3g" % (ns, err, moved))
    assert rel_err(ref, start) > 1e-2
    if ns == "float64":
        assert err < 2e-5
    else:
        assert moved < 0.05


def test_md_muon_group_info_and_telemetry():
    model = mlp(3)
    groups = [{"params": [p for p in model.parameters() if p.dim() == 2], "name": "matrices"},
              {"params": [p for p in model.parameters() if p.dim() == 1], "name": "vectors",
               "preset": "vector"}]
    opt = MDOptimizer(groups, preset="md-muon", lr=0.02, threads=1, update_norms=1)
    assert opt.group_info("matrices").orthogonalized == 0
    train(model, opt, 3)
    info = opt.group_info("matrices")
    assert (info.matrices, info.orthogonalized, info.projected, info.gain_stepped,
            info.skipped) == (3, 3, 3, 3, 0)
    # update_norms=1: the relative update of a step is of the order of lr.
    assert 0.2 * 0.02 < info.mean_relative_update < 5 * 0.02
    assert opt.group_info(1).matrices == 3 and opt.group_info(1).orthogonalized == 0
    assert opt.last_step.step == 3 and opt.last_step.grad_norm > 0
    # A NaN gradient skips the step: nothing changes, and the parameter is named.
    before = [p.detach().clone() for p in model.parameters()]
    x, y = batch(7)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    assert opt.last_step.skipped and opt.last_step.step == 3
    assert "holds NaN" in opt.last_step.message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.group_info("matrices").skipped == 3
