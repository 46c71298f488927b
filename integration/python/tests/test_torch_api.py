"""MDOptimizer as a torch.optim.Optimizer: refusals with clear messages, state_dict round
trips, param groups, LR schedulers, and the recipes."""
import copy
import io
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is not importable: pip install torch")

import mdopt  # noqa: E402
from helpers import batch, mlp, train  # noqa: E402
from mdopt.recipes import linear_decay, param_groups, wsd  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402


def P(*shape, **kw):
    return torch.nn.Parameter(torch.randn(*shape, **kw))


# --- refusals -----------------------------------------------------------------------------

def test_refuses_bad_tensors_naming_them():
    good = P(4, 3)
    with pytest.raises(ValueError, match=r"'w'.*float64.*float32 or bfloat16"):
        MDOptimizer([{"params": [P(4, 3, dtype=torch.float64)], "names": ["w"]}],
                    preset="adamw")
    w = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"'w'.*'wt'.*share memory"):  # a view of another
        MDOptimizer([{"params": [w, torch.nn.Parameter(w.detach().t())],
                      "names": ["w", "wt"]}])
    with pytest.raises(ValueError, match=r"'m'.*meta.*CPU or on one CUDA GPU"):
        MDOptimizer([{"params": [torch.nn.Parameter(torch.empty(4, 3, device="meta"))],
                      "names": ["m"]}])
    base = torch.randn(10)
    a, b = torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])
    with pytest.raises(ValueError, match=r"'a'.*'b'.*share memory"):
        MDOptimizer([good, a, b], preset="vector",
                    named_parameters=[("good", good), ("a", a), ("b", b)])
    frozen = torch.nn.Parameter(torch.randn(3, 3), requires_grad=False)
    with pytest.raises(ValueError, match="no parameter requires grad"):
        MDOptimizer([frozen])


def test_refuses_bad_groups_and_arguments():
    with pytest.raises(TypeError, match="unknown keyword argument 'lrr'"):
        MDOptimizer([P(4, 3)], lrr=1e-3)
    with pytest.raises(ValueError, match="key 'sphre' is unknown"):
        MDOptimizer([{"params": [P(4, 3)], "sphre": "row"}])
    with pytest.raises(ValueError, match="amsgrad=True is not available"):
        MDOptimizer([P(4, 3)], preset="adamw", amsgrad=True)
    MDOptimizer([P(4, 3)], preset="adamw", amsgrad=False, foreach=None)  # off: accepted
    with pytest.raises(mdopt.MdoptError) as e:
        MDOptimizer([{"params": [P(4, 3)], "name": "hidden", "preset": "md-muon",
                      "weight_decay": 0.1}])
    assert e.value.status == "MDOPT_INVALID_ARGUMENT"
    assert "'hidden'" in e.value.message and "weight_decay" in e.value.message
    with pytest.raises(mdopt.MdoptError, match="preset"):
        MDOptimizer([P(4, 3)], preset="sgd")
    with pytest.raises(mdopt.MdoptError) as e:  # Muon needs matrices
        MDOptimizer([{"params": [P(5)], "names": ["bias"]}], preset="muon")
    assert "'bias'" in e.value.message
    with pytest.raises(mdopt.MdoptError, match="threads"):
        MDOptimizer([P(4, 3)], threads=0)
    with pytest.raises(ValueError, match="both named 'x'"):
        MDOptimizer([{"params": [P(4, 3)], "name": "x"}, {"params": [P(4, 3)], "name": "x"}])


def test_add_param_group_before_and_after_the_first_step():
    model = mlp(8)
    opt = MDOptimizer([model[0].weight, model[2].weight, model[4].weight], threads=1)
    opt.add_param_group({"params": [model[0].bias, model[2].bias, model[4].bias],
                         "preset": "vector", "name": "biases"})
    # No lr given anywhere: each group gets its preset's (torch's defaults= would apply to all).
    assert [g["lr"] for g in opt.param_groups] == [8e-3, 1e-3]
    with pytest.raises(mdopt.MdoptError):     # a bad group is refused and not kept
        opt.add_param_group({"params": [P(3, 3)], "preset": "nope"})
    assert len(opt.param_groups) == 2
    train(model, opt, 2)
    assert opt.group_info("biases").matrices == 3
    with pytest.raises(RuntimeError, match="after the first step"):
        opt.add_param_group({"params": [P(3, 3)]})


def test_changing_a_fixed_key_after_the_build_is_refused():
    model = mlp(9)
    opt = MDOptimizer(model.parameters(), preset="adamw", threads=1)
    train(model, opt, 1)
    opt.param_groups[0]["betas"] = (0.8, 0.9)   # pushed (mdopt_set_group_hparam)
    opt.param_groups[0]["base"] = "muon"        # not changeable
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(mdopt.MdoptError, match="changed after the first step") as e:
        train(model, opt, 1)
    # The message names what changed, and only that.
    assert "base: the preset's -> muon" in e.value.message
    assert "lr:" not in e.value.message and "'lr'" not in e.value.message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- lr, schedulers -----------------------------------------------------------------------

def test_group_lr_is_pushed_every_step():
    model = mlp(10)
    opt = MDOptimizer(model.parameters(), preset="md-adamw", lr=2e-3, gain_lr=1e-3, threads=1)
    train(model, opt, 1)
    opt.param_groups[0]["lr"] = 5e-4
    train(model, opt, 1)
    assert opt.mdopt.group_lr("group0") == (5e-4, 2.5e-4)  # gain_lr by the same factor


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_schedules():
    model = mlp(11)
    opt = MDOptimizer(model.parameters(), preset="vector", lr=1.0, threads=1)
    s = linear_decay(opt, 10)
    seen = []
    for _ in range(11):
        seen.append(opt.param_groups[0]["lr"])
        s.step()
    assert seen[0] == 1.0 and seen[5] == pytest.approx(0.5 + 0.5e-8)
    assert seen[10] == pytest.approx(1e-8)
    lam = wsd(MDOptimizer(mlp(11).parameters(), preset="vector", lr=1.0, threads=1), 100,
              warmup_steps=10, cooldown_frac=0.2).lr_lambdas[0]
    assert lam(0) == pytest.approx(0.1) and lam(9) == 1.0 and lam(50) == 1.0
    assert lam(80) == 1.0
    assert lam(85) == pytest.approx(1e-8 + (1 - 1e-8) * (1 - math.sqrt(0.25)))
    assert lam(100) == pytest.approx(1e-8)
    with pytest.raises(ValueError):
        linear_decay(opt, 10, warmup_steps=10)


# --- state_dict ---------------------------------------------------------------------------

def run_with_checkpoint(preset, sched):
    """10 steps straight, and 5 + state_dict -> a fresh optimizer -> 5 more."""
    def build(model):
        opt = MDOptimizer(param_groups(model, matrix_preset=preset, lr=0.02), threads=1)
        return opt, (linear_decay(opt, 10) if sched else None)

    model = mlp(12)
    straight = copy.deepcopy(model)
    o1, s1 = build(straight)
    train(straight, o1, 10, s1)

    o2, s2 = build(model)
    train(model, o2, 5, s2)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": o2.state_dict(),
                "sched": s2.state_dict() if sched else None}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False) if "weights_only" in \
        torch.load.__code__.co_varnames else torch.load(buf)
    resumed = mlp(99)  # other weights: everything must come from the checkpoint
    resumed.load_state_dict(ck["model"])
    o3, s3 = build(resumed)
    o3.load_state_dict(ck["opt"])
    if sched:
        s3.load_state_dict(ck["sched"])
    train(resumed, o3, 5, s3, seed=105)
    return straight, resumed, o3


@pytest.mark.parametrize("preset,sched", [("md-muon", True), ("md-adamw", False)])
def test_state_dict_round_trip_continues_identically(preset, sched):
    straight, resumed, opt = run_with_checkpoint(preset, sched)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert opt.last_step.step == 10
    sd = opt.state_dict()
    assert sd["mdopt"]["world_size"] == 1 and sd["mdopt"]["step"] == 10
    assert "manifest.json" in sd["mdopt"]["files"]


def test_load_state_dict_refuses_foreign_dicts():
    opt = MDOptimizer(mlp(13).parameters(), preset="adamw", threads=1)
    with pytest.raises(ValueError, match="not an MDOptimizer state_dict"):
        opt.load_state_dict(torch.optim.AdamW(mlp(13).parameters()).state_dict())
    sd = opt.state_dict()
    sd["mdopt"]["files"]["manifest.json"] = b"{}"
    with pytest.raises(mdopt.MdoptError) as e:
        opt.load_state_dict(sd)
    assert e.value.status == "MDOPT_IO_ERROR"


# --- recipes ------------------------------------------------------------------------------

class TinyGPT(torch.nn.Module):
    def __init__(self, vocab=50, d=16, experts=3, tied=False):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.norm = torch.nn.LayerNorm(d)
        self.attn = torch.nn.Linear(d, 3 * d, bias=False)
        self.router = torch.nn.Linear(d, experts, bias=False)
        self.experts = torch.nn.Parameter(torch.randn(experts, 2 * d, d) / d ** 0.5)
        self.proj = torch.nn.Linear(2 * d, d, bias=False)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.tok.weight

    def forward(self, idx):
        h = self.norm(self.tok(idx))
        h = h + self.attn(h)[..., :h.shape[-1]]
        gate = torch.softmax(self.router(h), -1)
        up = torch.einsum("btd,emd->btem", h, self.experts)
        h = h + self.proj(torch.tanh((gate[..., None] * up).sum(2)))
        return self.lm_head(h)


def test_param_groups_follow_the_method():
    groups = {g["name"]: g for g in param_groups(TinyGPT(), matrix_preset="md-muon", lr=0.02)}
    assert sorted(groups["matrices"]["names"]) == ["attn.weight", "experts", "proj.weight"]
    assert groups["matrices"]["preset"] == "md-muon" and groups["matrices"]["lr"] == 0.02
    assert groups["matrices"]["gain_lr"] == 1e-3
    assert groups["embeddings"]["names"] == ["tok.weight"]
    assert groups["embeddings"]["preset"] == "embedding" and groups["embeddings"]["lr"] == 3e-3
    assert groups["head"]["names"] == ["lm_head.weight"] and groups["head"]["lr"] == 1e-3
    assert groups["head"]["gains"] == "rowcol" and groups["head"]["gain_lr"] == 1e-3
    assert groups["routers"]["names"] == ["router.weight"]
    assert groups["routers"]["preset"] == "router" and groups["routers"]["lr"] == 0.02
    assert groups["vectors"]["names"] == ["norm.weight", "norm.bias"]
    assert groups["vectors"]["lr"] == 1e-3
    tied = {g["name"]: g for g in param_groups(TinyGPT(tied=True))}
    assert "head" not in tied and tied["embeddings"]["names"] == ["tok.weight"]
    # head_gains="none": the head keeps unit-norm rows and has no gains (nor a gain_lr).
    model = TinyGPT()
    plain = {g["name"]: g for g in param_groups(model, head_gains="none")}
    assert plain["head"]["gains"] == "none" and "gain_lr" not in plain["head"]
    MDOptimizer(list(plain.values()), threads=1)  # projects the head's rows at finalize
    rows = model.lm_head.weight.detach().double().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-6, atol=0)


def test_recipe_trains_a_tiny_gpt_with_the_examples_spelling():
    torch.manual_seed(0)
    model = TinyGPT()
    opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), threads=1)
    sched = linear_decay(opt, 30)
    idx = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(30):
        opt.zero_grad()
        logits = model(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), idx[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    # Embedding rows at unit norm; the untied head's direction rows at unit norm, its row and
    # column gains on top; every expert of the stack on its own sphere.
    assert torch.allclose(model.tok.weight.norm(dim=1), torch.ones(50), atol=1e-5)
    head = opt.param_index(model.lm_head.weight)
    direction = torch.tensor(opt.mdopt.get_state(head, "direction")).reshape(50, 16)
    assert torch.allclose(direction.norm(dim=1), torch.ones(50, dtype=direction.dtype), atol=1e-5)
    gains = torch.outer(torch.tensor(opt.mdopt.get_state(head, "gain_row")),
                        torch.tensor(opt.mdopt.get_state(head, "gain_col")))
    assert torch.allclose(direction * gains, model.lm_head.weight.detach().to(direction.dtype),
                          atol=1e-5)
    assert opt.group_info("head").gain_stepped == 1
    info = opt.group_info("matrices")
    assert info.matrices == 1 + 3 + 1 and info.orthogonalized == 5 and info.projected == 5
    assert opt.group_info("routers").orthogonalized == 1


def test_bfloat16_weights_are_the_rounded_float32_master():
    model = mlp(14).to(torch.bfloat16)
    opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), threads=1)
    x, y = batch(400, dtype=torch.bfloat16)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x).float(), y.float())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for p in model.parameters():
        master = torch.tensor(opt.mdopt.get_state(opt.param_index(p), "master"),
                              dtype=torch.float64).reshape(p.shape)
        # mdopt keeps an f32 master for bf16 weights and writes it rounded to nearest even,
        # which is what torch's float32 -> bfloat16 conversion does.
        assert torch.equal(p, master.float().to(torch.bfloat16))
        assert not torch.equal(master.float(), p.float())  # the master has more bits


def test_an_attention_output_projection_is_not_the_head():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(40, 8)
            self.output = torch.nn.Linear(8, 8, bias=False)   # attention-style "output"
            self.lm_head = torch.nn.Linear(8, 40, bias=False)

    groups = {g["name"]: g["names"] for g in param_groups(Block())}
    assert groups["matrices"] == ["output.weight"] and groups["head"] == ["lm_head.weight"]


def test_grad_comm_dtype_reaches_mdopt_create():
    # An mdopt_create option: refused with the library's message when bad; at one rank no
    # gradient is reduced, so bf16 and f32 reductions give the same bits.
    with pytest.raises(mdopt.MdoptError, match="grad_comm_dtype"):
        MDOptimizer([P(4, 3)], preset="adamw", grad_comm_dtype="fp16")
    results = []
    for dtype in ("f32", "bf16"):
        torch.manual_seed(0)
        w = P(6, 5)
        opt = MDOptimizer([w], preset="md-adamw", threads=1, grad_comm_dtype=dtype)
        for _ in range(3):
            w.grad = torch.randn_like(w)
            opt.step()
        results.append(w.detach().clone())
    assert torch.equal(results[0], results[1])


def test_comm_pad_reaches_mdopt_create():
    # An mdopt_create option like the others: a bad value is refused with the library's
    # message; at one rank there is nothing to pad, so every value steps alike.
    with pytest.raises(mdopt.MdoptError, match="comm_pad"):
        MDOptimizer([P(4, 3)], preset="adamw", comm_pad="sometimes")
    for value in ("auto", "on", "off"):
        MDOptimizer([P(4, 3)], preset="adamw", threads=1, comm_pad=value)


def test_comm_abort_stops_the_optimizers_on_it():
    # A watchdog's abort: the optimizer on the communicator refuses its next step with
    # MDOPT_COMM_ERROR naming the reason, and its weights stay as they were.
    comm = mdopt.comm.local()
    w = P(6, 5)
    opt = MDOptimizer([w], preset="md-adamw", comm=comm, threads=1)
    w.grad = torch.randn_like(w)
    opt.step()
    before = w.detach().clone()
    comm.abort("watchdog: rank 3 silent for 600 s")
    with pytest.raises(mdopt.MdoptError, match="rank 3 silent") as e:
        opt.step()
    assert e.value.status == "MDOPT_COMM_ERROR"
    assert torch.equal(w.detach(), before)
    comm.abort("a second abort changes nothing")


class _GluMLP(torch.nn.Module):
    """x -> fc2(silu(gate) * up) with [gate; up] = fc1(x) fused by rows."""

    def __init__(self, d=12, f=10):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 2 * f, bias=False)
        self.fc2 = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(torch.nn.functional.silu(gate) * up)


def test_param_groups_blocks_put_each_half_of_a_glu_on_its_own_sphere():
    torch.manual_seed(3)
    model = _GluMLP()
    groups = param_groups(model, matrix_preset="muonh", lr=0.02, blocks={"fc1.weight": 2})
    by = {g["name"]: g for g in groups}
    assert by["matrices-rows2"]["names"] == ["fc1.weight"]
    assert by["matrices-rows2"]["blocks"] == "rows:2"
    assert by["matrices"]["names"] == ["fc2.weight"]
    opt = MDOptimizer(groups, threads=1, kernels="reference")
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(4))
    for _ in range(5):
        opt.zero_grad()
        model(x).square().mean().backward()
        model.fc1.weight.grad[:10] *= 10.0  # the gate's gradient ten times the up's
        opt.step()
    w = model.fc1.weight.detach().double()
    radius = math.sqrt(12)  # sqrt(max(f, d)) of a 10 x 12 block
    for half in (w[:10], w[10:]):
        assert abs(float(half.norm()) - radius) < 1e-5 * radius
    assert opt.group_info("matrices-rows2").matrices == 2
    with pytest.raises(ValueError, match="multiple"):
        param_groups(model, blocks={"fc1.weight": 3})
    with pytest.raises(ValueError, match="lacks"):
        param_groups(model, blocks={"fc9.weight": 2})


def test_param_groups_blocks_split_a_fused_qkv_across_its_query_groups():
    """A fused QKV of 2 query groups, each 2 query heads, one key and one value head of 4
    rows (rows per group: [q; q; k; v]): blocks={"qkv.weight": "groups:2:8,4,4"} makes Q, K
    and V, each gathered across the groups, a matrix of its own: after steps with md-muon
    (row and column gains) each one's direction (the weight over its gains, from opt.state)
    has the Frobenius norm sqrt(max(rows, cols)) of its own shape."""
    torch.manual_seed(5)
    model = torch.nn.Module()
    model.qkv = torch.nn.Linear(12, 2 * (8 + 4 + 4), bias=False)
    model.proj = torch.nn.Linear(12, 12, bias=False)
    groups = param_groups(model, matrix_preset="md-muon", lr=0.02,
                          blocks={"qkv.weight": "groups:2:8,4,4", "proj.weight": "rows:2"})
    by = {g["name"]: g for g in groups}
    assert by["matrices-groups2-8_4_4"]["names"] == ["qkv.weight"]
    assert by["matrices-groups2-8_4_4"]["blocks"] == "groups:2:8,4,4"
    assert by["matrices-rows2"]["blocks"] == "rows:2"
    opt = MDOptimizer(groups, threads=1)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 12, generator=g)
    for _ in range(4):
        opt.zero_grad()
        model.proj(model.qkv(x)[:, :12]).square().mean().backward()
        model.qkv.weight.grad += torch.randn(model.qkv.weight.shape, generator=g) * 1e-2
        opt.step()
    st = opt.state[model.qkv.weight]
    # gain_col: one copy per block (3 x 12), the copies equal (shared by the blocks).
    cols = torch.as_tensor(st["gain_col"], dtype=torch.float64).view(3, 12)
    assert torch.equal(cols, cols[:1].expand(3, 12))
    assert "gain_scalar" not in st  # md-muon: row and column gains
    d = model.qkv.weight.detach().double() / torch.outer(
        torch.as_tensor(st["gain_row"], dtype=torch.float64), cols[0])
    per_group = d.view(2, 16, 12)
    worst = 0.0
    for piece in per_group.split([8, 4, 4], dim=1):  # Q (16 x 12), K and V (8 x 12)
        b = piece.reshape(-1, 12)
        radius = math.sqrt(max(b.shape))
        worst = max(worst, abs(float(b.norm()) - radius) / radius)
    assert worst < 1e-5
    assert abs(float(d.norm()) - math.sqrt(32)) > 1e-2  # not one sphere over the weight
    assert opt.group_info("matrices-groups2-8_4_4").matrices == 3
    with pytest.raises(ValueError, match="not 2 groups of 8 \\+ 4 \\+ 3 rows"):
        param_groups(model, blocks={"qkv.weight": "groups:2:8,4,3"})
    with pytest.raises(ValueError, match="groups:G:h0,h1"):
        param_groups(model, blocks={"qkv.weight": "groups:2"})
