"""MDOptimizer keeps the invariants torch users rely on of a torch.optim optimizer: copies,
frozen and gradient-less parameters, non-contiguous parameters, torch's error types and
wording, scheduler-driven hyperparameters, hooks, opt.state, gradients left as they were."""
import copy
import pickle
import warnings

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")

import mdopt  # noqa: E402
from helpers import batch, mlp, train  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402


def P(*shape, **kw):
    return torch.nn.Parameter(torch.randn(*shape, **kw))


def loss_step(model, opt, seed):
    x, y = batch(seed)
    opt.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


# --- copies -------------------------------------------------------------------------------

def test_deepcopy_is_an_independent_optimizer_with_the_same_state():
    model = mlp(1, bias=False)
    opt = MDOptimizer(model.parameters(), threads=1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for t in range(3):
        loss_step(model, opt, 10 + t)
        sched.step()
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2 is not opt and opt2.mdopt is not opt.mdopt
    assert all(a is b for a, b in zip(opt2.param_groups[0]["params"], model2.parameters()))
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 8e-3 / 8
    # The same step on both: bit for bit the same weights (state and lr were copied).
    loss_step(model, opt, 20)
    loss_step(model2, opt2, 20)
    assert same(snapshot(model), snapshot(model2))
    assert opt2.mdopt.group_lr("group0") == opt.mdopt.group_lr("group0")
    # Independent from then on: stepping the original leaves the copy where it was.
    kept = snapshot(model2)
    loss_step(model, opt, 21)
    assert same(kept, snapshot(model2)) and not same(kept, snapshot(model))
    loss_step(model2, opt2, 21)
    assert same(snapshot(model), snapshot(model2))


def test_deepcopy_of_the_optimizer_alone_copies_its_parameters():
    model = mlp(2, bias=False)
    opt = MDOptimizer(model.parameters(), threads=1)
    loss_step(model, opt, 1)
    opt2 = copy.deepcopy(opt)
    copies = opt2.param_groups[0]["params"]
    assert all(c is not p and torch.equal(c, p) for c, p in zip(copies, model.parameters()))
    for c in copies:
        c.grad = torch.ones_like(c)
    before = snapshot(model)
    opt2.step()
    assert same(before, snapshot(model))  # the original parameters are not touched
    assert not same(before, [c.detach() for c in copies])


def test_shallow_copy_shares_the_optimizer_and_pickle_is_refused():
    model = mlp(3, bias=False)
    opt = MDOptimizer(model.parameters(), threads=1)
    c = copy.copy(opt)
    assert c.param_groups is opt.param_groups and c.mdopt is opt.mdopt
    loss_step(model, c, 1)  # steps the one mdopt optimizer both objects hold
    loss_step(model, opt, 2)
    assert c.last_step.step == 1 and opt.last_step.step == 2
    with pytest.raises(TypeError, match="cannot be pickled.*state_dict"):
        pickle.dumps(opt)


# --- frozen and missing gradients ---------------------------------------------------------

def test_half_frozen_model_trains_and_frozen_weights_stay_as_they_were():
    model = mlp(4, bias=False, dims=(12, 32, 32, 32, 6))
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    for lin in linears[:2]:
        lin.weight.requires_grad_(False)
    frozen = [p.detach().clone() for lin in linears[:2] for p in lin.parameters()]
    opt = MDOptimizer(model.parameters(), threads=1)  # frozen ones listed too, as in torch
    assert len(opt.param_groups[0]["params"]) == 4
    losses = [loss_step(model, opt, 5) for _ in range(30)]  # one batch, fitted
    assert losses[-1] < 0.6 * losses[0], losses
    assert same(frozen, [p for lin in linears[:2] for p in lin.parameters()])
    # Unfrozen later: refused (mdopt does not hold it), nothing changes.
    linears[0].weight.requires_grad_(True)
    before = snapshot(model)
    with pytest.raises(mdopt.MdoptError, match="frozen.*build the optimizer after unfreezing"):
        loss_step(model, opt, 6)
    assert same(before, snapshot(model))


def test_no_gradient_at_all_is_a_no_op():
    model = mlp(5)
    opt = MDOptimizer(model.parameters(), preset="adamw", threads=1)
    loss_step(model, opt, 1)
    state = {k: dict(v) for k, v in opt.read_state().items()}
    before = snapshot(model)
    opt.zero_grad()  # set_to_none: every .grad is None
    opt.step()
    assert opt.last_step is None
    assert same(before, snapshot(model))
    after = opt.read_state()
    for p in model.parameters():
        assert after[p]["step"].item() == 1.0
        assert torch.equal(after[p]["exp_avg"], state[p]["exp_avg"])
        assert torch.equal(after[p]["exp_avg_sq"], state[p]["exp_avg_sq"])


def test_an_expert_without_tokens_is_left_untouched_while_the_others_train():
    # An MoE-like layer, a module per expert; at step 3 the router sends no token to expert 1,
    # so its .grad is None: as in torch.optim, its weights and state stay as they were while
    # the other experts step exactly as an optimizer holding only them would.
    torch.manual_seed(6)
    experts = [torch.nn.Linear(8, 8, bias=False) for _ in range(3)]
    twins = copy.deepcopy(experts)  # experts 0 and 2 alone, in a second optimizer
    opt = MDOptimizer([e.weight for e in experts], threads=1)
    alone = MDOptimizer([twins[0].weight, twins[2].weight], threads=1)
    for t in range(5):
        x = torch.randn(16, 8)
        opt.zero_grad()
        alone.zero_grad()
        routed = [0, 2] if t == 2 else [0, 1, 2]
        for k in routed:
            experts[k](x * (k + 1)).square().mean().backward()
        for k in (0, 2):
            twins[k](x * (k + 1)).square().mean().backward()
        state = {k: dict(v) for k, v in opt.read_state().items()}
        before = [e.weight.detach().clone() for e in experts]
        opt.step()
        alone.step()
        assert opt.last_step.step == t + 1 and not opt.last_step.skipped
        stats = opt.group_info(0)
        assert stats.matrices == 3
        if t == 2:
            assert experts[1].weight.grad is None
            assert torch.equal(experts[1].weight, before[1])
            after = opt.read_state()[experts[1].weight]
            for key in state[experts[1].weight]:  # its own step count included
                assert torch.equal(after[key], state[experts[1].weight][key]), key
            assert (stats.skipped, stats.orthogonalized, stats.projected) == (1, 2, 2)
        else:
            assert not torch.equal(experts[1].weight, before[1])
            assert (stats.skipped, stats.orthogonalized, stats.projected) == (0, 3, 3)
        for k in (0, 2):
            assert not torch.equal(experts[k].weight, before[k])
            assert torch.equal(experts[k].weight, twins[k].weight), (t, k)
        # Each expert's own step count: expert 1 lags by the step it sat out.
        steps = [opt.state[e.weight]["step"].item() for e in experts]
        assert steps == [t + 1, t if t >= 2 else t + 1, t + 1], (t, steps)


def test_an_adam_expert_that_sat_out_steps_steps_as_torch_adamw():
    # adamw: an expert without tokens at steps 2 and 3 of 6 keeps its own step count, so its
    # steps after them are bias-corrected as torch.optim.AdamW's (which leaves a parameter
    # whose .grad is None untouched, its state["step"] included): the same weights to
    # float32 rounding, and state["step"] as torch's.
    torch.manual_seed(9)
    ours = [P(6, 5) for _ in range(3)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    opt = MDOptimizer(ours, preset="adamw", threads=1, **kw)
    ref = torch.optim.AdamW(theirs, **kw)
    for t in range(6):
        for k in range(3):
            has = not (k == 1 and t in (1, 2))
            g = torch.randn(6, 5) if has else None
            ours[k].grad = None if g is None else g.clone()
            theirs[k].grad = None if g is None else g.clone()
        opt.step()
        ref.step()
        for k in range(3):
            assert opt.state[ours[k]]["step"].item() == ref.state[theirs[k]]["step"].item(), (t, k)
            err = ((ours[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item()
            assert err < 1e-5, (t, k, err)
    assert opt.state[ours[1]]["step"].item() == 4 and opt.last_step.step == 6


def test_gradients_are_never_modified():
    model = mlp(7, bias=False)
    bf = torch.nn.Parameter(torch.randn(6, 4).to(torch.bfloat16))
    opt = MDOptimizer([{"params": list(model.parameters())},
                       {"params": [bf], "preset": "adamw"}], threads=1)
    x, y = batch(3)
    torch.nn.functional.mse_loss(model(x), y).backward()
    bf.grad = torch.randn(4, 6).to(torch.bfloat16).t()  # non-contiguous: staged
    grads = [p.grad.clone() for p in list(model.parameters()) + [bf]]
    opt.step()
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, list(model.parameters()) + [bf]))


# --- non-contiguous parameters ------------------------------------------------------------

def test_non_contiguous_parameters_step_like_contiguous_ones():
    torch.manual_seed(8)
    base = torch.randn(5, 7)
    nc = torch.nn.Parameter(base.clone().t())  # 7 x 5, strides (1, 7)
    c = torch.nn.Parameter(base.clone().t().contiguous())
    assert not nc.is_contiguous()
    o_nc = MDOptimizer([nc], threads=1)
    o_c = MDOptimizer([c], threads=1)
    assert torch.equal(nc, c)  # projected onto the sphere alike
    for t in range(4):
        g = torch.randn(7, 5)
        nc.grad, c.grad = g.clone(), g.clone()
        o_nc.step()
        o_c.step()
    assert torch.equal(nc, c) and nc.stride() == (1, 7)
    # A change torch makes to the weights between steps is seen by mdopt (f32: its master).
    with torch.no_grad():
        nc.mul_(0.5)
        c.mul_(0.5)
    nc.grad, c.grad = torch.ones(7, 5), torch.ones(7, 5)
    o_nc.step()
    o_c.step()
    assert torch.equal(nc, c)
    # state_dict round trip through the staged tensor.
    sd = o_nc.state_dict()
    with torch.no_grad():
        nc.zero_()
    o_nc.load_state_dict(sd)
    assert torch.equal(nc, c)


# --- torch's error conventions ------------------------------------------------------------

@pytest.mark.parametrize("kw, message", [
    ({"lr": -1e-3}, "Invalid learning rate: -0.001"),
    ({"betas": (1.0, 0.9), "preset": "adamw"}, "Invalid beta parameter at index 0: 1.0"),
    ({"betas": (0.9, -0.1), "preset": "adamw"}, "Invalid beta parameter at index 1: -0.1"),
    ({"eps": -1e-8, "preset": "adamw"}, "Invalid epsilon value: -1e-08"),
    ({"weight_decay": -0.1, "preset": "adamw"}, "Invalid weight_decay value: -0.1"),
    ({"momentum": -0.5}, "Invalid momentum value: -0.5"),
    ({"lr": torch.tensor([1e-3, 2e-3])}, "Tensor lr must be 1-element"),
])
def test_invalid_hyperparameters_are_value_errors_worded_like_torch(kw, message):
    kw = dict(kw)
    preset = kw.pop("preset", "md-muon")
    with pytest.raises(ValueError) as e:
        MDOptimizer([P(4, 3)], preset=preset, **kw)
    assert str(e.value) == message
    with pytest.raises(ValueError) as e:  # the same in a param group
        MDOptimizer([{"params": [P(4, 3)], **kw}], preset=preset)
    assert str(e.value) == message


def test_a_tensor_lr_of_one_element_is_accepted_and_pushed():
    model = mlp(9, bias=False)
    opt = MDOptimizer(model.parameters(), lr=torch.tensor(4e-3), threads=1)
    loss_step(model, opt, 1)
    opt.param_groups[0]["lr"].fill_(1e-3)
    loss_step(model, opt, 2)
    assert opt.mdopt.group_lr("group0")[0] == pytest.approx(1e-3)


def test_a_parameter_listed_twice_is_warned_and_registered_once():
    w, v = P(4, 3), P(3, 3)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = MDOptimizer([{"params": [w, v, w], "names": ["w", "v", "w2"]}], threads=1)
    assert opt.param_groups[0]["params"] == [w, v]
    assert opt.param_groups[0]["names"] == ["w", "v"]
    w.grad, v.grad = torch.ones(4, 3), torch.ones(3, 3)
    opt.step()
    assert opt.group_info(0).matrices == 2


# --- schedulers ---------------------------------------------------------------------------

def test_one_cycle_with_cycled_betas_steps_as_torch_adamw():
    # OneCycleLR moves lr and beta1 every step; mdopt's adamw preset takes both
    # (mdopt_set_group_lr, mdopt_set_group_hparam) and follows torch's AdamW.
    torch.manual_seed(13)
    w0 = torch.randn(6, 5)
    ours = torch.nn.Parameter(w0.clone())
    theirs = torch.nn.Parameter(w0.clone())
    opt = MDOptimizer([ours], preset="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                      weight_decay=0.1, threads=1)
    ref = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    kw = dict(max_lr=1e-2, total_steps=12, base_momentum=0.8, max_momentum=0.95)
    s_ours = torch.optim.lr_scheduler.OneCycleLR(opt, **kw)
    s_ref = torch.optim.lr_scheduler.OneCycleLR(ref, **kw)
    pushed = set()
    for t in range(12):
        g = torch.randn(6, 5)
        ours.grad, theirs.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        beta1 = opt.mdopt.group_hparam("group0", "beta1")
        assert beta1 == opt.param_groups[0]["betas"][0]
        pushed.add(round(beta1, 12))
        s_ours.step()
        s_ref.step()
    assert len(pushed) >= 10  # beta1 really moved, step after step
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    assert err < 1e-5, err


def test_cyclic_momentum_is_pushed_to_muon_groups():
    model = mlp(14, bias=False)
    opt = MDOptimizer(model.parameters(), momentum=0.9, threads=1)
    sched = torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-3, max_lr=1e-2, step_size_up=3,
                                              base_momentum=0.8, max_momentum=0.9)
    seen = []
    for t in range(6):
        loss_step(model, opt, t)
        seen.append((opt.mdopt.group_hparam("group0", "momentum"),
                     opt.param_groups[0]["momentum"]))
        sched.step()
    assert all(a == pytest.approx(b, abs=0) for a, b in seen)
    assert min(a for a, _ in seen) == pytest.approx(0.8) and max(a for a, _ in seen) == 0.9


def test_keys_that_cannot_change_are_refused_naming_them_and_lr_schedulers_work():
    model = mlp(10, bias=False)
    opt = MDOptimizer(model.parameters(), threads=1)
    loss_step(model, opt, 1)
    opt.param_groups[0]["ns_steps"] = 3
    with pytest.raises(mdopt.MdoptError, match=r"'group0' changed after the first step "
                                               r"\(ns_steps: the preset's -> 3\)") as e:
        loss_step(model, opt, 2)
    assert "lr:" not in e.value.message
    del opt.param_groups[0]["ns_steps"]
    # A value mdopt refuses for this group's rule: an MdoptError naming it, nothing set.
    opt.param_groups[0]["weight_decay"] = 0.1
    with pytest.raises(mdopt.MdoptError, match="weight_decay.*sphere"):
        loss_step(model, opt, 2)
    assert opt.mdopt.group_hparam("group0", "weight_decay") == 0.0
    del opt.param_groups[0]["weight_decay"]
    model = mlp(10)
    opt = MDOptimizer(model.parameters(), preset="adamw", threads=1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10,
                                                cycle_momentum=False)
    pushed = []
    for t in range(5):
        lr = opt.param_groups[0]["lr"]
        loss_step(model, opt, t)
        pushed.append((opt.mdopt.group_lr("group0")[0], lr))
        sched.step()
    assert all(a == b for a, b in pushed) and len({b for _, b in pushed}) == 5
    assert opt.last_step.step == 5


# --- hooks and opt.state ------------------------------------------------------------------

def test_step_and_state_dict_hooks_run():
    model = mlp(11, bias=False)
    opt = MDOptimizer(model.parameters(), threads=1)
    calls = []
    opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o.last_step)))
    opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o.last_step.step)))
    opt.register_state_dict_post_hook(lambda o, sd: sd.update(extra=7) or sd)
    loss_step(model, opt, 1)
    assert calls == [("pre", None), ("post", 1)]
    assert opt.state_dict()["extra"] == 7


def test_opt_state_holds_copies_of_mdopt_state_under_torch_names():
    torch.manual_seed(12)
    w = P(6, 4)   # md-muon: momentum buffer and gains
    b = P(6)      # adamw: exp_avg, exp_avg_sq
    opt = MDOptimizer([{"params": [w]}, {"params": [b], "preset": "adamw", "betas": (0.8, 0.9)}],
                      threads=1)
    assert len(opt.state) == 0 and opt.state[w] == {}  # as in torch: empty until a step
    gw, gb = torch.randn(6, 4), torch.randn(6)
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    sw, sb = opt.state[w], opt.state[b]
    assert sw["step"].item() == 1.0 and sb["step"].item() == 1.0
    assert set(sb) == {"step", "exp_avg", "exp_avg_sq"}
    # Adam's first moments after one step from zero: (1 - beta1) g and (1 - beta2) g^2.
    assert torch.allclose(sb["exp_avg"], 0.2 * gb, rtol=1e-6)
    assert torch.allclose(sb["exp_avg_sq"], 0.1 * gb * gb, rtol=1e-5)
    assert sw["momentum_buffer"].shape == w.shape
    assert {"gain_row", "gain_col", "radius"} <= set(sw)
    assert sw["gain_row"].shape == (6,) and sw["gain_col"].shape == (4,)
    sb["exp_avg"].zero_()  # a copy: mdopt's state is not changed
    assert torch.allclose(opt.read_state()[b]["exp_avg"], 0.2 * gb, rtol=1e-6)
    assert "state" in opt.state_dict() and opt.state_dict()["state"] == {}
