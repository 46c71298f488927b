"""mdopt.megatron against Megatron-Core (megatron-core 0.16.1) on the CPU.

A two-layer GPTModel of Megatron-Core (its own embedding, attention, MLP and output layer)
trains with MegatronMDOptimizer driven by Megatron's OptimizerParamScheduler, and every
step is checked against mdopt.torch.MDOptimizer run by hand on an identical model with the
groups, learning rates and clipping written out here independently. Megatron-Core's
dist_checkpointing.save needs CUDA in this release (it synchronises the device), so the
sharded path is checked on what sharded_state_dict returns and on what load would hand back.

Two CPU shims, test-only, make Megatron-Core's attention run without a GPU: its global
memory buffer allocates on torch.cuda.current_device(), and its dropout forks the CUDA RNG
tracker (dropout is 0 here, so the fork is a no-op).
"""

import contextlib
import io
import math
import os
import socket
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(__file__), "..")))

try:
    import megatron.core  # noqa: F401
except ImportError:
    pytest.skip("megatron-core is not installed (pip install megatron-core==0.16.1): the "
                "Megatron-Core adapter is not tested", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core import utils as megatron_utils  # noqa: E402
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace  # noqa: E402
from megatron.core.dist_checkpointing.mapping import ShardedObject  # noqa: E402
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from mdopt.megatron import SHARDED_KEY, MegatronMDOptimizer, get_megatron_mdopt_optimizer  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402

VOCAB, SEQ, BATCH, LAYERS = 64, 16, 2, 2
LR, DECAY_STEPS = 0.01, 5


class _CPUMemoryBuffer(megatron_utils.GlobalMemoryBuffer):
    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        n = math.prod(tensor_shape)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = self.buffer[(name, dtype)] = torch.empty(n, dtype=dtype)
        return buf[:n].view(*tensor_shape)


@pytest.fixture(scope="module", autouse=True)
def megatron_cpu():
    """torch.distributed on gloo at world size 1 and Megatron's parallel state (TP=PP=1)."""
    started = not dist.is_initialized()
    if started:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % port, rank=0,
                                world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    parallel_state._GLOBAL_MEMORY_BUFFER = _CPUMemoryBuffer()
    tracker = tensor_parallel.get_cuda_rng_tracker()
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    yield
    del tracker.fork
    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def make_model(seed):
    torch.manual_seed(seed)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=32, num_attention_heads=4,
                            use_cpu_initialization=True, hidden_dropout=0.0,
                            attention_dropout=0.0)
    return GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=VOCAB, max_sequence_length=SEQ)


def batches(n, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
             torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)) for _ in range(n)]


_POS = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
_MASK = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).tril().logical_not()


def backward(model, batch):
    tokens, labels = batch
    loss = model(tokens, _POS, _MASK, labels=labels).mean()
    loss.backward()
    return loss.item()


def config(**kw):
    base = dict(optimizer="muon", lr=LR, min_lr=0.0, weight_decay=0.1, adam_beta1=0.9,
                adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.0, muon_momentum=0.95,
                muon_use_nesterov=True, muon_num_ns_steps=5)
    base.update(kw)
    return OptimizerConfig(**base)


def scheduler(opt, start_wd=0.1, end_wd=0.1, wd_style="constant"):
    return OptimizerParamScheduler(opt, init_lr=0.0, max_lr=LR, min_lr=0.0, lr_warmup_steps=0,
                                   lr_decay_steps=DECAY_STEPS, lr_decay_style="linear",
                                   start_wd=start_wd, end_wd=end_wd,
                                   wd_incr_steps=DECAY_STEPS, wd_incr_style=wd_style)


def to_main_grad(model):
    """What Megatron's DDP leaves behind: gradients in param.main_grad, param.grad None."""
    for p in model.parameters():
        if p.grad is None:
            continue
        if getattr(p, "main_grad", None) is None:
            p.main_grad = torch.zeros_like(p)
        p.main_grad.add_(p.grad)
        p.grad = None


def reference_groups(model, matrix_preset, cfg):
    """The groups the method's recipe gives this model, written out by name: 2-D weights
    of the blocks -> the matrix preset at cfg.lr; word and position embeddings -> embedding
    at 3e-3; the LM head -> embedding with row and column gains at 1e-3; 1-D tensors -> vector at 1e-3 (Megatron puts
    no weight decay on them); linear_qkv (4 heads of 8 rows, no GQA: 4 query groups of one
    Q, K and V head each) in a matrix group of its own with blocks=groups:4:8,8,8 (Q, K and
    V each across the groups). Same order as the adapter's: matrix, matrix-groups...,
    embedding, output, vector."""
    named = list(model.named_parameters())
    muon = matrix_preset in ("md-muon", "muon")
    common = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    mat = dict(common, preset=matrix_preset, lr=cfg.lr, name="matrix.0")
    if muon:
        mat.update(momentum=cfg.muon_momentum, nesterov=True, ns_steps=cfg.muon_num_ns_steps)
    if matrix_preset in ("muon", "adamw"):
        mat["weight_decay"] = cfg.weight_decay
    emb_names = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
    qkv = QKV_GROUP[0]
    groups = [
        (mat, [n for n, p in named if p.dim() == 2 and n.startswith("decoder.") and
               not n.endswith("linear_qkv.weight")]),
        (dict(mat, name=qkv, blocks=QKV_GROUP[1]),
         [n for n, p in named if n.endswith("linear_qkv.weight")]),
        (dict(common, preset="embedding", lr=3e-3, name="embedding.0"), list(emb_names)),
        (dict(common, preset="embedding", gains="rowcol", lr=1e-3, name="output.0"),
         ["output_layer.weight"]),
        (dict(common, preset="vector", lr=1e-3, weight_decay=0.0, name="vector.1"),
         [n for n, p in named if p.dim() == 1]),
    ]
    params = dict(named)
    assert sum(len(ns) for _, ns in groups) == len(named)
    if matrix_preset.startswith("md-"):  # the output projections' depth-scaled spheres
        for n, p in named:
            if n.endswith(("linear_proj.weight", "linear_fc2.weight")):
                p.mdopt_radius_scale = 1.0 / math.sqrt(2 * cfg_layers(model))
    return [dict(g, params=[params[n] for n in ns], names=ns) for g, ns in groups]


def cfg_layers(model):
    return model.config.num_layers


def lr_mult(t):
    """Megatron's linear decay without warmup, written out: 1 - t / decay_steps."""
    return max(0.0, 1.0 - t / DECAY_STEPS)


# make_model's linear_qkv: its mdopt group and blocks.
QKV_GROUP = ("matrix-groups4-8_8_8.0", "groups:4:8,8,8")
BASE_LRS = {"matrix.0": LR, QKV_GROUP[0]: LR, "embedding.0": 3e-3, "output.0": 1e-3, "vector.1": 1e-3}


def set_reference_lrs(ref, t):
    """Each group's base lr times where the schedule is: Megatron's lr over its max_lr."""
    scheduled = 0.0 + lr_mult(t) * (LR - 0.0)  # min_lr + coeff * (max_lr - min_lr)
    for g in ref.param_groups:
        g["lr"] = BASE_LRS[g["name"]] * (scheduled / LR)


def grad_stats(model):
    grads = [p.grad if p.grad is not None else p.main_grad for p in model.parameters()]
    norm = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
    zeros = sum(int((g == 0).sum()) for g in grads)
    return norm, zeros


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("optimizer,presets,matrix_preset", [
    ("muon", None, "md-muon"),
    ("adam", None, "md-adamw"),
    ("muon", {"matrix": "muon"}, "muon"),
])
def test_steps_equal_mdoptimizer(optimizer, presets, matrix_preset):
    """Adapter (gradients in main_grad, Megatron's scheduler) == MDOptimizer by hand, bit
    for bit; telemetry and the returned grad norm and zero count against float64."""
    cfg = config(optimizer=optimizer, log_num_zeros_in_grad=True)
    model_a, model_b = make_model(1), make_model(1)
    opt = get_megatron_mdopt_optimizer(cfg, [model_a], presets=presets, threads=1)
    sched = scheduler(opt)
    ref = MDOptimizer(reference_groups(model_b, matrix_preset, cfg), threads=1)
    assert [n for n, _, _ in opt.mdopt_groups()] == ["matrix.0", QKV_GROUP[0], "embedding.0",
                                                     "output.0", "vector.1"]
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)  # both projected onto their spheres alike at build

    for t, batch in enumerate(batches(4)):
        opt.zero_grad()
        backward(model_a, batch)
        to_main_grad(model_a)
        norm64, zeros = grad_stats(model_a)
        ok, grad_norm, num_zeros = opt.step()
        assert ok
        assert grad_norm == pytest.approx(norm64, rel=1e-5)
        assert num_zeros == zeros
        sched.step(increment=1)

        ref.zero_grad()
        backward(model_b, batch)
        set_reference_lrs(ref, t)
        ref.step()
        assert opt.last_step.step == ref.last_step.step == t + 1
        for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
            assert torch.equal(a, b), "%s differs after step %d" % (n, t + 1)

    # The scheduler's lr reached mdopt: base lr (and gain_lr) times lr / max_lr.
    mult = lr_mult(3)
    lr, gain_lr = opt.optimizer.mdopt.group_lr("embedding.0")
    assert lr == pytest.approx(3e-3 * mult, rel=1e-12)
    lr, gain_lr = opt.optimizer.mdopt.group_lr("matrix.0")
    assert lr == pytest.approx(LR * mult, rel=1e-12)
    if matrix_preset.startswith("md-"):
        assert gain_lr == pytest.approx(1e-3 * mult, rel=1e-12)
    # No silent fallback: every block matrix was orthogonalized (Muon) and projected (MD):
    # linear_proj, fc1, fc2 in matrix.0, each linear_qkv's Q, K and V blocks in its group.
    for name, matrices in (("matrix.0", 3 * LAYERS), (QKV_GROUP[0], 3 * LAYERS)):
        info = opt.group_info(name)
        assert info.matrices == matrices, name
        assert info.orthogonalized == (matrices if "muon" in matrix_preset else 0), name
        assert info.projected == (matrices if matrix_preset.startswith("md-") else 0), name
    assert opt.group_info("embedding.0").projected == 2


def test_clipping():
    """clip_grad: Megatron's semantics (the norm before clipping is returned; every
    gradient is scaled by clip / (norm + 1e-6) when that is below 1), checked against the
    float64 norm and torch.nn.utils.clip_grad_norm_; the step then uses the clipped
    gradients (MDOptimizer by hand on them gives the same weights, bit for bit)."""
    cfg = config(clip_grad=0.05)
    model_a, model_b = make_model(2), make_model(2)
    opt = get_megatron_mdopt_optimizer(cfg, [model_a], threads=1)
    sched = scheduler(opt)
    ref = MDOptimizer(reference_groups(model_b, "md-muon", cfg), threads=1)
    for t, batch in enumerate(batches(3, seed=11)):
        opt.zero_grad()
        backward(model_a, batch)
        raw = [p.grad.clone() for p in model_a.parameters()]
        norm64, _ = grad_stats(model_a)
        ok, grad_norm, num_zeros = opt.step()
        assert ok and num_zeros is None
        assert grad_norm == pytest.approx(norm64, rel=1e-5)
        coeff = 0.05 / (norm64 + 1e-6)
        assert coeff < 0.5  # the threshold is well below every step's norm: clipping ran
        for (n, p), g in zip(model_a.named_parameters(), raw):
            torch.testing.assert_close(p.grad, g * coeff, rtol=1e-5, atol=1e-9, msg=n)
        sched.step(increment=1)

        ref.zero_grad()
        backward(model_b, batch)
        torch_norm = float(torch.nn.utils.clip_grad_norm_(list(model_b.parameters()), 0.05))
        assert grad_norm == pytest.approx(torch_norm, rel=1e-5)
        for a, b in zip(model_a.parameters(), model_b.parameters()):
            b.grad = a.grad.clone()  # the adapter's clipped gradients, as they are
        set_reference_lrs(ref, t)
        ref.step()
        for (n, a), b in zip(model_a.named_parameters(), model_b.parameters()):
            assert torch.equal(a, b), "%s differs after step %d" % (n, t + 1)


def _train(model, opt, sched, data):
    for batch in data:
        opt.zero_grad()
        backward(model, batch)
        ok, _, _ = opt.step()
        assert ok
        sched.step(increment=1)


@pytest.mark.parametrize("path", ["state_dict", "sharded"])
def test_checkpoint_round_trip(path, tmp_path):
    """Train 2 steps, save; a fresh model and adapter load it and continue 3 steps: the
    same weights, bit for bit, as training 5 steps without stopping."""
    cfg = config()
    data = batches(5, seed=3)
    model = make_model(4)
    opt = get_megatron_mdopt_optimizer(cfg, [model], threads=1)
    sched = scheduler(opt)
    _train(model, opt, sched, data[:2])
    saved_weights = weights(model)
    if path == "state_dict":
        buf = io.BytesIO()
        torch.save({"optimizer": opt.state_dict(), "sched": sched.state_dict()}, buf)
        loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        opt_sd = loaded["optimizer"]
    else:
        sharded = opt.sharded_state_dict(model.sharded_state_dict())
        obj = sharded["mdopt"]
        assert isinstance(obj, ShardedObject) and obj.key == SHARDED_KEY
        assert obj.global_shape == (1,) and obj.global_offset == (0,)
        assert obj.replica_id == (0, 0, 0) and isinstance(obj.data, bytes)
        template = opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True)
        assert template["mdopt"].without_data() == obj.without_data()
        assert template["mdopt"].data is None
        # What dist_checkpointing.load returns: every ShardedObject replaced by its data,
        # the common (non-sharded) entries as saved by torch.save.
        buf = io.BytesIO()
        torch.save(dict_list_map_inplace(lambda x: x.data if isinstance(x, ShardedObject)
                                         else x, sharded), buf)
        opt_sd = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
        loaded = {"sched": sched.state_dict()}
    _train(model, opt, sched, data[2:])

    fresh = make_model(5)  # other initial weights: the load must bring the saved ones
    assert not torch.equal(fresh.output_layer.weight, saved_weights["output_layer.weight"])
    opt2 = get_megatron_mdopt_optimizer(cfg, [fresh], threads=1)
    sched2 = scheduler(opt2)
    sched2.load_state_dict(loaded["sched"])
    opt2.load_state_dict(opt_sd)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, saved_weights[n]), n
    _train(fresh, opt2, sched2, data[2:])
    assert opt2.last_step.step == opt.last_step.step == 5
    for (n, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), "%s differs after the resumed steps" % n


def test_non_finite_gradient_skips():
    """A NaN gradient: (False, None, None), nothing changes; the next step proceeds."""
    cfg = config(clip_grad=1.0)
    model = make_model(6)
    opt = get_megatron_mdopt_optimizer(cfg, [model], threads=1)
    data = batches(2, seed=5)
    backward(model, data[0])
    model.decoder.layers[1].mlp.linear_fc1.weight.grad[3, 4] = float("nan")
    before = weights(model)
    assert opt.step() == (False, None, None)
    assert opt.last_step.skipped and opt.last_step.step == 0
    assert "linear_fc1" in opt.last_step.message
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert opt.group_info("matrix.0").skipped == 3 * LAYERS
    assert opt.group_info(QKV_GROUP[0]).skipped == 3 * LAYERS
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    backward(model, data[1])
    ok, grad_norm, _ = opt.step()
    assert ok and math.isfinite(grad_norm) and opt.last_step.step == 1


def test_weight_decay_is_fixed_when_built():
    """A flat group (plain Muon) takes config.weight_decay * wd_mult; a scheduler that
    changes weight decay is refused at the step, not ignored."""
    cfg = config()
    model = make_model(8)
    opt = get_megatron_mdopt_optimizer(cfg, [model], presets={"matrix": "muon"}, threads=1)
    scheduler(opt, start_wd=0.0, end_wd=0.1, wd_style="linear")
    backward(model, batches(1)[0])
    with pytest.raises(RuntimeError, match="weight_decay changed"):
        opt.step()


def test_interface_and_refusals():
    model = make_model(9)
    opt = get_megatron_mdopt_optimizer(config(), [model], threads=1)
    assert isinstance(opt, MegatronMDOptimizer)
    assert torch.equal(opt.get_loss_scale(), torch.ones(1))
    assert opt.scale_loss(torch.tensor(2.5)).item() == 2.5
    assert {id(p) for p in opt.get_parameters()} == {id(p) for p in model.parameters()}
    assert [g["wd_mult"] for g in opt.param_groups] == [1.0, 0.0]
    assert opt.state_dict()["mdopt"]["mdopt"]["step"] == 0
    # reload_model_params: weights set from outside; mdopt is rebuilt on them (projected).
    with torch.no_grad():
        model.output_layer.weight.mul_(3.0)
    opt.reload_model_params()
    rows = model.output_layer.weight.detach().double().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-6, atol=1e-6)
    for bad, match in [(dict(fp16=True), "fp16"),
                       (dict(use_distributed_optimizer=True), "use_distributed_optimizer"),
                       (dict(optimizer="sgd"), "no mdopt preset"),
                       (dict(lr=None), "lr is not set")]:
        with pytest.raises(ValueError, match=match):
            get_megatron_mdopt_optimizer(config(**bad), [model], threads=1)
    with pytest.raises(ValueError, match="unknown role"):
        get_megatron_mdopt_optimizer(config(), [model], presets={"matrices": "muon"})


def make_glu_model(seed, moe=False):
    """A GPT with SwiGLU MLPs and GQA (4 heads in 2 query groups, kv_channels 8); with `moe`,
    every layer an MoE of 4 SequentialMLP experts (top-2) plus a shared expert."""
    torch.manual_seed(seed)
    kw = dict(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, num_query_groups=2,
              ffn_hidden_size=48, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
              add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
              attention_dropout=0.0)
    if moe:
        kw.update(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=20,
                  moe_shared_expert_intermediate_size=24)
    cfg = TransformerConfig(**kw)
    spec = get_gpt_layer_local_spec(num_experts=4 if moe else None)
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ)


def _halves_norms(w):
    f = w.shape[0] // 2
    return float(w[:f].double().norm()), float(w[f:].double().norm())


def _blocks_of(w, layout):
    """The logical matrices of weight w under a blocks= layout, gathered from its rows in
    torch: rows:K -> K equal contiguous blocks; groups:G:h0,h1,... -> block j = piece j of
    each of the G groups (hj rows each), in group order; anything else -> [w]."""
    if not layout or not layout.startswith("blocks="):
        return [w]
    kind, _, rest = layout[len("blocks="):].partition(":")
    if kind == "rows":
        return list(w.chunk(int(rest)))
    g, heights = rest.split(":")
    heights = [int(h) for h in heights.split(",")]
    per_group = w.reshape(int(g), sum(heights), w.shape[-1])
    return [b.reshape(-1, w.shape[-1]) for b in per_group.split(heights, dim=1)]


def _glu_model_mapping(moe, tied=False):
    """Every parameter of make_glu_model, written out by name: (mdopt group, layout or None,
    radius of each block: sqrt(max(rows, cols)) of the block, times 1/sqrt(2 layers) for
    linear_proj and linear_fc2; None for the tensors off a Frobenius sphere). linear_qkv (2
    query groups of 2 query heads, one key and one value head, 8 rows each): Q, K and V
    across the groups, blocks of 32, 16 and 16 rows x 32."""
    d, scale = 32, 1.0 / math.sqrt(2 * LAYERS)
    qkv = "blocks=groups:2:16,8,8"
    want = {"embedding.word_embeddings.weight": ("embedding.0", None, None),
            "embedding.position_embeddings.weight": ("embedding.0", None, None),
            "decoder.final_layernorm.weight": ("vector.1", None, None),
            "decoder.final_layernorm.bias": ("vector.1", None, None)}
    if not tied:
        want["output_layer.weight"] = ("output.0", None, None)
    for i in range(LAYERS):
        layer = "decoder.layers.%d." % i
        for norm in ("input_layernorm", "pre_mlp_layernorm"):
            for t in ("weight", "bias"):
                want[layer + norm + "." + t] = ("vector.1", None, None)
        want[layer + "self_attention.linear_qkv.weight"] = ("matrix-groups2-16_8_8.0", qkv,
                                                            math.sqrt(32))
        want[layer + "self_attention.linear_proj.weight"] = ("matrix.0", None,
                                                             math.sqrt(d) * scale)
        mlps = {"mlp.": 48}
        if moe:
            mlps = {"mlp.shared_experts.": 24}
            mlps.update({"mlp.experts.local_experts.%d." % e: 20 for e in range(4)})
            want[layer + "mlp.router.weight"] = ("router.0", None, None)
        for m, ffn in mlps.items():
            want[layer + m + "linear_fc1.weight"] = ("matrix-rows2.0", "blocks=rows:2",
                                                     math.sqrt(max(ffn, d)))
            want[layer + m + "linear_fc2.weight"] = ("matrix.0", None,
                                                     math.sqrt(max(ffn, d)) * scale)
    return want


def _gains(opt, p):
    """A parameter's row and column gains as mdopt holds them, in float64."""
    idx = opt.optimizer.param_index(p)
    return [torch.tensor(opt.optimizer.mdopt.get_state(idx, k), dtype=torch.float64)
            for k in ("gain_row", "gain_col")]


@pytest.mark.parametrize("moe", [False, True])
def test_fused_layouts_detected_and_blocks_on_their_spheres(moe):
    """A SwiGLU + GQA GPT (and an MoE one: 4 SequentialMLP experts, a shared expert, the
    router) through the adapter end to end: every parameter's mdopt group and layout, as
    written out by name, and the depth-scaled radii of linear_proj and linear_fc2; each GLU
    fc1 is registered with blocks=rows:2, so after steps each half is on its own sphere
    (sqrt(max(f, d)), muonh: no gains) where the same run without blocks leaves them off;
    each linear_qkv with blocks=groups:2:16,8,8, its Q, K and V (gathered across the query
    groups) each on its own sphere; every other matrix on its radius; the router's and the untied head's directions
    (weight / row and column gains) keep unit rows; a tied head has no group of its own.
    (tests/unit/blocks_test.cc holds each block's update to the float64 reference run on
    that block alone; this test checks the detection and the wiring.)"""
    model = make_glu_model(21, moe)
    opt = get_megatron_mdopt_optimizer(config(), [model], presets={"matrix": "muonh"},
                                       threads=1)
    named = dict(model.named_parameters())
    layouts = opt.layouts
    want = _glu_model_mapping(moe)
    groups = {n: g["name"] for g in opt.optimizer.param_groups for n in g["names"]}
    assert groups == {n: w[0] for n, w in want.items()}
    assert layouts == {n: w[1] for n, w in want.items() if w[1]}
    by_name = {g["name"]: g for g in opt.optimizer.param_groups}
    assert by_name["output.0"]["preset"] == "embedding"
    assert by_name["output.0"]["gains"] == "rowcol"
    assert by_name["matrix-rows2.0"]["blocks"] == "rows:2"
    for n, p in named.items():
        out_proj = n.endswith(("linear_proj.weight", "linear_fc2.weight"))
        assert getattr(p, "mdopt_radius_scale", None) == \
            (1.0 / math.sqrt(2 * LAYERS) if out_proj else None), n
    fc1 = sorted(n for n in named if n.endswith("linear_fc1.weight"))
    qkv = sorted(n for n in named if n.endswith("linear_qkv.weight"))
    assert len(qkv) == LAYERS
    assert len(fc1) == (LAYERS * 5 if moe else LAYERS)  # 4 experts + 1 shared expert per layer
    for n in fc1:
        assert layouts[n] == "blocks=rows:2", n
    for n in qkv:
        assert layouts[n] == "blocks=groups:2:16,8,8", n
    assert set(layouts) == set(fc1) | set(qkv)  # linear_proj, fc2, routers: not fused
    assert by_name["matrix-groups2-16_8_8.0"]["blocks"] == "groups:2:16,8,8"
    assert sorted(by_name["matrix-groups2-16_8_8.0"]["names"]) == qkv
    glu = [g for g in opt.optimizer.param_groups if g["name"].startswith("matrix-rows2.")]
    assert len(glu) == 1 and sorted(glu[0]["names"]) == fc1
    plain = [g for g in opt.optimizer.param_groups if g["name"].startswith("matrix.")]
    assert not set(plain[0]["names"]) & set(fc1)
    if moe:
        routers = [n for g in opt.optimizer.param_groups if g["name"].startswith("router.")
                   for n in g["names"]]
        assert sorted(routers) == sorted(n for n in named if n.endswith("router.weight"))

    control = make_glu_model(21, moe)
    ref = get_megatron_mdopt_optimizer(config(), [control], presets={"matrix": "muonh"},
                                       spec={"matrix": {"blocks": "none"}}, threads=1)
    # The control registers fc1 as one matrix ("blocks": "none" overrides the layout's key).
    # Gradients drawn here (Megatron's MoE dispatch needs a GPU), the gate half of every fc1
    # ten times the up half's: one sphere over [gate; up] lets the halves' norms drift apart.
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        for name, p in named.items():
            grad = torch.randn(p.shape, generator=g) * 1e-2
            if name in fc1:
                grad[: p.shape[0] // 2] *= 10.0
            p.main_grad = grad
            dict(control.named_parameters())[name].main_grad = grad.clone()
        for o in (opt, ref):
            ok, _, _ = o.step()
            assert ok
    worst, off = 0.0, 0.0
    for n in fc1:
        w = dict(model.named_parameters())[n].detach()
        f, d = w.shape[0] // 2, w.shape[1]
        radius = math.sqrt(max(f, d))
        for b in _halves_norms(w):
            worst = max(worst, abs(b - radius) / radius)
        wc = dict(control.named_parameters())[n].detach()
        off = max(off, max(abs(b - radius) / radius for b in _halves_norms(wc)))
    print("[ measured ] fc1 halves vs their radius: blocks %.2e, one sphere %.2e" % (worst, off))
    assert worst < 1e-5
    assert off > 1e-2
    worst, off = 0.0, 0.0
    for n in qkv:  # Q, K, V across the query groups; the control's one sphere over all
        for b in _blocks_of(named[n].detach().double(), layouts[n]):
            worst = max(worst, abs(float(b.norm()) - math.sqrt(32)) / math.sqrt(32))
        wc = dict(control.named_parameters())[n].detach().double()
        off = max(off, max(abs(float(b.norm()) - math.sqrt(32)) / math.sqrt(32)
                           for b in _blocks_of(wc, layouts[n])))
    print("[ measured ] qkv Q/K/V vs their radius: blocks %.2e, one sphere %.2e"
          % (worst, off))
    assert worst < 1e-5
    assert off > 1e-2
    worst = 0.0
    for n, (_, lay, radius) in want.items():
        if radius is not None and lay is None:
            worst = max(worst, abs(float(named[n].detach().double().norm()) - radius) / radius)
    print("[ measured ] the other matrices vs their radius: %.2e" % worst)
    assert worst < 1e-5
    heads = ["output_layer.weight"] + [n for n in named if n.endswith("router.weight")]
    for n in heads:  # the direction's rows on the unit sphere, row and column gains on top
        gr, gc = _gains(opt, named[n])
        rows = (named[n].detach().double() / torch.outer(gr, gc)).norm(dim=1)
        torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-5, atol=0, msg=n)
    assert opt.group_info("output.0").gain_stepped == 1
    # A head tied to the embedding is the embedding's parameter: no output group.
    torch.manual_seed(21)
    tied = GPTModel(config=model.config, transformer_layer_spec=get_gpt_layer_local_spec(
        num_experts=4 if moe else None), vocab_size=VOCAB, max_sequence_length=SEQ,
        share_embeddings_and_output_weights=True)
    assert tied.output_layer.weight is None
    opt = get_megatron_mdopt_optimizer(config(), [tied], presets={"matrix": "muonh"},
                                       threads=1)
    want = _glu_model_mapping(moe, tied=True)
    groups = {n: g["name"] for g in opt.optimizer.param_groups for n in g["names"]}
    assert groups == {n: w[0] for n, w in want.items()}
    assert "gains" not in {g["name"]: g for g in opt.optimizer.param_groups}["embedding.0"]


def test_layouts_of_mla_and_gated_attention_modules():
    """megatron_layouts reads modules and their config alone: a module with MLA's attributes
    (the real MLASelfAttention is test_mla_gpt_layouts_and_spheres'; this one also changes
    v_head_dim after construction) and a linear_qkv with the attention output gate."""
    from types import SimpleNamespace

    from mdopt.megatron import megatron_layouts

    heads, q_lora, kv_lora, qk, rope, v, d = 4, 16, 12, 8, 4, 6, 32
    mla_cfg = SimpleNamespace(num_attention_heads=heads, qk_head_dim=qk, qk_pos_emb_head_dim=rope,
                              v_head_dim=v, kv_lora_rank=kv_lora, gated_linear_unit=False)

    class MLA(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = mla_cfg
            self.linear_q_down_proj = torch.nn.Linear(d, q_lora, bias=False)
            self.linear_q_up_proj = torch.nn.Linear(q_lora, heads * (qk + rope), bias=False)
            self.linear_kv_down_proj = torch.nn.Linear(d, kv_lora + rope, bias=False)
            self.linear_kv_up_proj = torch.nn.Linear(kv_lora, heads * (qk + v), bias=False)

    gate_cfg = SimpleNamespace(num_attention_heads=8, num_query_groups=2, kv_channels=4,
                               attention_output_gate=True, gated_linear_unit=False)

    class GatedAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = gate_cfg
            # per query group: 4 query heads, 4 gate heads, 1 key, 1 value head of 4 rows
            self.linear_qkv = torch.nn.Linear(d, 2 * (4 + 4 + 1 + 1) * 4, bias=False)

    model = torch.nn.ModuleDict({"mla": MLA(), "attn": GatedAttention()})
    names = {p: n for n, p in model.named_parameters()}
    got = {names[p]: lay for p, lay in megatron_layouts(model).items()}
    # The authors' split: q_up whole; kv_up's K (8 rows a head) and V (6) across the 4
    # heads; kv_down's [kv_lora_rank; rope] rows; linear_qkv's Q, gate, K and V (stored per
    # query group in that order) across the 2 groups.
    assert got == {
        "mla.linear_q_up_proj.weight": "mla_q_up=heads:4,rows:12",
        "mla.linear_kv_up_proj.weight": "blocks=groups:4:8,6",
        "mla.linear_kv_down_proj.weight": "blocks=groups:1:12,4",
        "attn.linear_qkv.weight": "blocks=groups:2:16,16,4,4",
    }
    # Per head: q_up by heads, qkv by its 20 heads; kv_up's K and V heads differ in height
    # (8 and 6 rows), which equal row blocks cannot express: K and V across heads as above.
    got = {names[p]: lay for p, lay in megatron_layouts(model, split_heads=True).items()}
    assert got == {
        "mla.linear_q_up_proj.weight": "blocks=rows:4",
        "mla.linear_kv_up_proj.weight": "blocks=groups:4:8,6",
        "mla.linear_kv_down_proj.weight": "blocks=groups:1:12,4",
        "attn.linear_qkv.weight": "blocks=rows:20",
    }
    mla_cfg.v_head_dim = 8
    model["mla"].linear_kv_up_proj = torch.nn.Linear(kv_lora, heads * (qk + 8), bias=False)
    names = {p: n for n, p in model.named_parameters()}
    got = {names[p]: lay for p, lay in megatron_layouts(model, split_heads=True).items()}
    assert got["mla.linear_kv_up_proj.weight"] == "blocks=rows:8"
    # Weights whose rows do not add up to their layout are reported and stay whole.
    gate_cfg.attention_output_gate = False  # 2 x (4 + 1 + 1) x 4 = 48 rows, not 80
    mla_cfg.kv_lora_rank = 10
    got = {names[p]: lay for p, lay in megatron_layouts(model).items()}
    assert got == {
        "mla.linear_q_up_proj.weight": "mla_q_up=heads:4,rows:12",
        "mla.linear_kv_up_proj.weight": "blocks=groups:4:8,8",
        "mla.linear_kv_down_proj.weight": "mla_kv_down=rows:10,4",
        "attn.linear_qkv.weight": "qkv=groups:2,q:4,k:1,v:1 head_dim:4",
    }


def test_layouts_of_fused_mla_down_projection():
    """Newer megatron-core's FusedMLASelfAttention keeps q_down and kv_down in one
    linear_qkv_down_proj, [q_lora_rank; kv_lora_rank; rope] rows: three contiguous blocks
    (a module with its attributes stands in for it; the installed megatron-core has none)."""
    from types import SimpleNamespace

    from mdopt.megatron import megatron_layouts

    heads, q_lora, kv_lora, qk, rope, v, d = 4, 16, 12, 8, 4, 6, 32
    cfg = SimpleNamespace(num_attention_heads=heads, qk_head_dim=qk, qk_pos_emb_head_dim=rope,
                          v_head_dim=v, kv_lora_rank=kv_lora, q_lora_rank=q_lora,
                          gated_linear_unit=False)

    class FusedMLA(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.config = cfg
            self.linear_qkv_down_proj = torch.nn.Linear(d, rows, bias=False)
            self.linear_q_up_proj = torch.nn.Linear(q_lora, heads * (qk + rope), bias=False)
            self.linear_kv_up_proj = torch.nn.Linear(kv_lora, heads * (qk + v), bias=False)

    for rows, want in ((q_lora + kv_lora + rope, "blocks=groups:1:16,12,4"),
                       (q_lora + kv_lora, "mla_qkv_down=rows:16,12,4")):
        mod = FusedMLA(rows)
        got = megatron_layouts(mod)
        assert got[mod.linear_qkv_down_proj.weight] == want
        assert got[mod.linear_kv_up_proj.weight] == "blocks=groups:4:8,6"


def test_split_heads_puts_every_attention_head_on_its_own_sphere():
    model = make_glu_model(23)
    opt = get_megatron_mdopt_optimizer(config(), [model], presets={"matrix": "muonh"},
                                       split_heads=True, threads=1)
    named = dict(model.named_parameters())
    qkv = sorted(n for n in named if n.endswith("linear_qkv.weight"))
    assert all(opt.layouts[n] == "blocks=rows:8" for n in qkv)  # 2 groups x (2 q + k + v)
    by = {g["name"]: g["names"] for g in opt.optimizer.param_groups}
    assert sorted(by["matrix-rows8.0"]) == qkv
    g = torch.Generator().manual_seed(6)
    for _ in range(3):
        for p in named.values():
            p.main_grad = torch.randn(p.shape, generator=g) * 1e-2
        ok, _, _ = opt.step()
        assert ok
    for n in qkv:
        heads = named[n].detach().double().view(8, 8, 32)  # 8 heads of 8 rows x 32
        norms = heads.flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, math.sqrt(32)), rtol=1e-5,
                                   atol=0)


def test_qkv_blocks_with_gains():
    """md-muon (row and column gains) on the SwiGLU + GQA GPT: after steps the direction of
    every linear_qkv (the weight over its effective gains from opt.state) has its Q, K and V,
    gathered across the 2 query groups, each on its own sphere (sqrt(max(rows, cols)) =
    sqrt(32), radius scale 1)."""
    model = make_glu_model(25)
    opt = get_megatron_mdopt_optimizer(config(), [model], threads=1)
    named = dict(model.named_parameters())
    qkv = sorted(n for n in named if n.endswith("linear_qkv.weight"))
    by = {g["name"]: g for g in opt.optimizer.param_groups}
    assert by["matrix-groups2-16_8_8.0"]["preset"] == "md-muon"
    assert sorted(by["matrix-groups2-16_8_8.0"]["names"]) == qkv
    g = torch.Generator().manual_seed(8)
    for _ in range(3):
        for p in named.values():
            p.main_grad = torch.randn(p.shape, generator=g) * 1e-2
        assert opt.step()[0]
    worst = 0.0
    for n in qkv:
        st = opt.optimizer.state[named[n]]
        assert len(st["radius"]) == 3, n  # one sphere per block
        cols = torch.as_tensor(st["gain_col"], dtype=torch.float64).view(3, 32)  # per block
        assert torch.equal(cols, cols[:1].expand(3, 32)), n  # shared by the blocks
        d = named[n].detach().double() / torch.outer(
            torch.as_tensor(st["gain_row"], dtype=torch.float64), cols[0])
        for b in _blocks_of(d, opt.layouts[n]):
            worst = max(worst, abs(float(b.norm()) - math.sqrt(32)) / math.sqrt(32))
    print("[ measured ] md-muon qkv directions' Q/K/V vs their radius: %.2e" % worst)
    assert worst < 1e-5


def test_lm_head_gains():
    """An untied LM head gets row and column gains by default (spec={"output": {"gains":
    "none"}} turns them off); a head tied to the embedding has no output group and steps
    with the embedding's (gainless) group; recipes.param_groups does the same."""
    from mdopt.recipes import param_groups

    def groups(opt):
        return {g["name"]: g for g in opt.optimizer.param_groups}

    model = make_model(3)
    opt = get_megatron_mdopt_optimizer(config(), [model], threads=1)
    assert groups(opt)["output.0"]["gains"] == "rowcol"
    assert "gains" not in groups(opt)["embedding.0"]
    backward(model, batches(1)[0])
    to_main_grad(model)
    assert opt.step()[0]
    assert opt.group_info("output.0").gain_stepped == 1
    assert opt.group_info("embedding.0").gain_stepped == 0
    # The direction's rows on the unit sphere, the row and column gains on top.
    state = opt.optimizer.mdopt
    gr = torch.tensor(state.get_state(opt.optimizer.param_index(model.output_layer.weight),
                                      "gain_row"), dtype=torch.float64)
    gc = torch.tensor(state.get_state(opt.optimizer.param_index(model.output_layer.weight),
                                      "gain_col"), dtype=torch.float64)
    d = model.output_layer.weight.detach().double() / torch.outer(gr, gc)
    torch.testing.assert_close(d.norm(dim=1), torch.ones(VOCAB, dtype=torch.float64),
                               rtol=1e-5, atol=1e-5)
    off = get_megatron_mdopt_optimizer(config(), [make_model(3)], threads=1,
                                       spec={"output": {"gains": "none"}})
    assert groups(off)["output.0"]["gains"] == "none"
    plain = get_megatron_mdopt_optimizer(config(), [make_model(3)], threads=1,
                                         presets={"output": "vector"})
    assert "gains" not in groups(plain)["output.0"]

    torch.manual_seed(3)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=32, num_attention_heads=4,
                            use_cpu_initialization=True, hidden_dropout=0.0,
                            attention_dropout=0.0)
    tied = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                    vocab_size=VOCAB, max_sequence_length=SEQ,
                    share_embeddings_and_output_weights=True)
    opt = get_megatron_mdopt_optimizer(config(), [tied], threads=1)
    names = [n for n, _, _ in opt.mdopt_groups()]
    assert "output.0" not in names and "embedding.0" in names
    assert "gains" not in groups(opt)["embedding.0"]

    head = torch.nn.Module()
    head.emb = torch.nn.Embedding(VOCAB, 32)
    head.hidden = torch.nn.Linear(32, 32, bias=False)
    head.lm_head = torch.nn.Linear(32, VOCAB, bias=False)
    g = {x["name"]: x for x in param_groups(head, lr=0.02)}
    assert g["head"]["gains"] == "rowcol" and g["head"]["gain_lr"] == 1e-3
    assert g["head"]["preset"] == "embedding" and "gains" not in g["embeddings"]
    head.lm_head.weight = head.emb.weight  # tied: the embedding's parameter and group
    g = {x["name"]: x for x in param_groups(head, lr=0.02)}
    assert "head" not in g and len(g["embeddings"]["params"]) == 1


def test_out_proj_radius_scale():
    """linear_proj and linear_fc2 of the matrix group sit on a sphere of radius
    sqrt(max(m, n)) / sqrt(2 num_layers) (the method's hypersphere_scale_out_proj_init), the
    other matrices on sqrt(max(m, n)); scale_out_proj_radius=False, a flat matrix preset or
    radius=init leave every radius alone."""
    def radii(opt, model):
        """name -> (mdopt's radius, sqrt(max(rows, cols)), Frobenius norm) of the first
        block: linear_qkv's Q (4 query groups of one 8-row head each: 32 x 32)."""
        out = {}
        for n, p in model.named_parameters():
            if p.dim() == 2 and n.startswith("decoder."):
                r = opt.optimizer.mdopt.get_state(opt.optimizer.param_index(p), "radius")
                w = _blocks_of(p.detach().double(), opt.layouts.get(n))[0]
                out[n] = (r[0], math.sqrt(max(w.shape)), w.norm().item())
        return out

    scale = 1.0 / math.sqrt(2 * LAYERS)
    model = make_model(5)
    opt = get_megatron_mdopt_optimizer(config(), [model], threads=1)
    got = radii(opt, model)
    assert len(got) == 4 * LAYERS
    for n, (r, auto, norm) in got.items():
        want = auto * scale if n.endswith(("linear_proj.weight", "linear_fc2.weight")) else auto
        assert r == pytest.approx(want, rel=1e-6), n
        assert norm == pytest.approx(want, rel=1e-5), n  # projected at finalize
    assert sum(n.endswith(("linear_proj.weight", "linear_fc2.weight")) for n in got) == 2 * LAYERS
    model = make_model(5)
    off = get_megatron_mdopt_optimizer(config(), [model], threads=1, scale_out_proj_radius=False)
    for n, (r, auto, _) in radii(off, model).items():
        assert r == pytest.approx(auto, rel=1e-6), n
    model = make_model(5)
    init = get_megatron_mdopt_optimizer(config(), [model], threads=1,
                                        spec={"matrix": {"radius": "init"}})
    for n, (r, _, norm) in radii(init, model).items():
        assert r == pytest.approx(norm, rel=1e-5), n
    model = make_model(5)
    get_megatron_mdopt_optimizer(config(), [model], threads=1, presets={"matrix": "muon"})
    assert not any(hasattr(p, "mdopt_radius_scale") for p in model.parameters())


@pytest.mark.parametrize("glu", [True, False])
def test_legacy_grouped_mlp_is_refused(glu, monkeypatch):
    """Megatron's legacy GroupedMLP (moe_grouped_gemm=True with the local spec) keeps every
    expert's fc1 transposed, side by side in one hidden x (E * fc1 width) weight1 ([gate |
    up] as column halves with a GLU) and the fc2s in one (E * ffn) x hidden weight2. mdopt
    would put them all on one sphere, so the layouts say what they are and the adapter
    refuses the model, naming the module and what to build instead. GroupedMLP checks at
    construction that the grouped_gemm package (a CUDA extension) is importable; that check
    is bypassed here (test-only): the weights are built on the CPU as on a GPU, and nothing
    runs them."""
    from megatron.core.transformer.moe import experts as megatron_experts
    from megatron.core.transformer.moe import grouped_gemm_util

    from mdopt.megatron import megatron_layouts

    monkeypatch.setattr(grouped_gemm_util, "assert_grouped_gemm_is_available", lambda: None)
    torch.manual_seed(31)
    kw = dict(num_layers=LAYERS, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
              add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
              attention_dropout=0.0, num_moe_experts=4, moe_router_topk=2,
              moe_ffn_hidden_size=20, moe_grouped_gemm=True)
    if glu:
        kw.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    model = GPTModel(config=TransformerConfig(**kw),
                     transformer_layer_spec=get_gpt_layer_local_spec(num_experts=4,
                                                                     moe_grouped_gemm=True),
                     vocab_size=VOCAB, max_sequence_length=SEQ)
    experts = model.decoder.layers[0].mlp.experts
    assert type(experts) is megatron_experts.GroupedMLP
    width = 2 * 20 if glu else 20
    assert tuple(experts.weight1.shape) == (32, 4 * width)
    assert tuple(experts.weight2.shape) == (4 * 20, 32)
    names = {p: n for n, p in model.named_parameters()}
    got = {names[p]: lay for p, lay in megatron_layouts(model).items()}
    fc1 = "gate:20,up:20" if glu else "ffn:20"
    want = {}
    for i in range(LAYERS):
        want["decoder.layers.%d.mlp.experts.weight1" % i] = \
            "grouped_fc1=experts:4,%s transposed" % fc1
        want["decoder.layers.%d.mlp.experts.weight2" % i] = \
            "grouped_fc2=experts:4,ffn:20 transposed"
        want["decoder.layers.%d.self_attention.linear_qkv.weight" % i] = \
            "blocks=groups:4:8,8,8"
    assert got == want
    with pytest.raises(ValueError) as err:
        get_megatron_mdopt_optimizer(config(), [model], threads=1)
    msg = str(err.value)
    print("[ message  ]", msg)
    assert msg.startswith("mdopt.megatron: decoder.layers.0.mlp.experts (and 1 more) is "
                          "Megatron's legacy GroupedMLP")
    assert "weight1 (32 x %d) holds the fc1 of all 4 experts transposed" % (4 * width) in msg
    assert ("gate and up as column halves" in msg) == glu
    assert "TEGroupedMLP" in msg and "SequentialMLP (moe_grouped_gemm=False)" in msg


class _SDPACoreAttention(torch.nn.Module):
    """Core attention for the MLA test (parameter-free, as Megatron's own): softmax(QK^T *
    scale) V with the query/key and value head dims MLA passes (k_channels, v_channels),
    which Megatron-Core 0.16.1's local DotProductAttention does not accept."""

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 softmax_scale=None, k_channels=None, v_channels=None, cp_comm_type=None,
                 pg_collection=None):
        super().__init__()
        self.softmax_scale = softmax_scale

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                packed_seq_params=None):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, dim]
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask.logical_not(), scale=self.softmax_scale)
        return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)


def make_mla_model(seed, q_lora_rank, monkeypatch):
    """A real Megatron-Core GPT with multi-latent attention (MLASelfAttention from the local
    layer spec, SwiGLU MLPs, RoPE) on the CPU: 4 heads, qk_head_dim 8, rope dims 4,
    v_head_dim 6, kv_lora_rank 12, q_lora_rank 16 (q_down + q_up) or None (one q
    projection). Three test-only shims, none touching a parameter: in 0.16.1 the MLA module
    believes Transformer Engine is there when it is not (HAVE_TE with mocked classes), its
    RoPE asks torch.cuda.current_device() for where to put its frequencies, and the local
    spec's DotProductAttention does not take MLA's k_channels/v_channels, so a
    parameter-free SDPA core attention stands in."""
    from megatron.core.transformer import multi_latent_attention
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    monkeypatch.setattr(multi_latent_attention, "HAVE_TE", False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: "cpu")
    torch.manual_seed(seed)
    cfg = MLATransformerConfig(
        num_layers=LAYERS, hidden_size=32, num_attention_heads=4, q_lora_rank=q_lora_rank,
        kv_lora_rank=12, qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=6, rope_type="rope",
        ffn_hidden_size=48, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, use_cpu_initialization=True, hidden_dropout=0.0,
        attention_dropout=0.0)
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True,
                                    normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = _SDPACoreAttention
    return GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=VOCAB,
                    max_sequence_length=SEQ, position_embedding_type="rope")


@pytest.mark.parametrize("q_lora_rank", [16, None])
def test_mla_gpt_layouts_and_spheres(q_lora_rank, monkeypatch):
    """A real MLA GPT through the adapter: every parameter's group and layout (q_up or q by
    heads of qk + rope rows, reported and whole; kv_down split into its [kv_lora_rank; rope
    rows]; kv_up per head K then V, split into K and V across the heads), linear_proj and
    linear_fc2 on depth-scaled spheres; after 3 steps on its own gradients (forward and
    backward through MLASelfAttention) every matrix's Frobenius norm, computed here in
    float64, equals the radius written out from its shape (muonh: no gains, so the weight is
    the direction), each SwiGLU half, kv_down piece and kv_up K and V block its own."""
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    from mdopt.megatron import megatron_layouts

    model = make_mla_model(41, q_lora_rank, monkeypatch)
    assert all(isinstance(layer.self_attention, MLASelfAttention)
               for layer in model.decoder.layers)
    opt = get_megatron_mdopt_optimizer(config(), [model], presets={"matrix": "muonh"},
                                       threads=1)
    named = dict(model.named_parameters())
    heads, qk, rope, v, kv_lora, d, ffn = 4, 8, 4, 6, 12, 32, 48
    scale = 1.0 / math.sqrt(2 * LAYERS)
    # name -> (mdopt group, layout or None, the radius of each block)
    want = {"embedding.word_embeddings.weight": ("embedding.0", None, None),
            "output_layer.weight": ("output.0", None, None),
            "decoder.final_layernorm.weight": ("vector.1", None, None)}
    for i in range(LAYERS):
        at = "decoder.layers.%d.self_attention." % i
        mlp = "decoder.layers.%d.mlp." % i
        want.update({
            "decoder.layers.%d.input_layernorm.weight" % i: ("vector.1", None, None),
            "decoder.layers.%d.pre_mlp_layernorm.weight" % i: ("vector.1", None, None),
            at + "kv_layernorm.weight": ("vector.1", None, None),
            # kv_down: [kv_lora_rank; rope] rows, 12 x 32 and 4 x 32; kv_up: K and V across
            # the heads, 4 x 8 = 32 rows and 4 x 6 = 24 rows x kv_lora_rank.
            at + "linear_kv_down_proj.weight": ("matrix-groups1-12_4.0", "blocks=groups:1:%d,%d"
                                                % (kv_lora, rope), [math.sqrt(d)] * 2),
            at + "linear_kv_up_proj.weight": ("matrix-groups4-8_6.0", "blocks=groups:%d:%d,%d"
                                              % (heads, qk, v),
                                              [math.sqrt(heads * qk), math.sqrt(heads * v)]),
            at + "linear_proj.weight": ("matrix.0", None, math.sqrt(d) * scale),
            mlp + "linear_fc1.weight": ("matrix-rows2.0", "blocks=rows:2", math.sqrt(ffn)),
            mlp + "linear_fc2.weight": ("matrix.0", None, math.sqrt(ffn) * scale),
        })
        if q_lora_rank:
            want.update({
                at + "q_layernorm.weight": ("vector.1", None, None),
                at + "linear_q_down_proj.weight": ("matrix.0", None, math.sqrt(d)),
                at + "linear_q_up_proj.weight": ("matrix.0", "mla_q_up=heads:%d,rows:%d"
                                                 % (heads, qk + rope),
                                                 math.sqrt(heads * (qk + rope))),
            })
        else:
            want[at + "linear_q_proj.weight"] = ("matrix.0", "mla_q=heads:%d,rows:%d"
                                                 % (heads, qk + rope),
                                                 math.sqrt(heads * (qk + rope)))
    groups = {n: g["name"] for g in opt.optimizer.param_groups for n in g["names"]}
    assert groups == {n: w[0] for n, w in want.items()}
    assert opt.layouts == {n: w[1] for n, w in want.items() if w[1]}
    # The layouts' pieces are the weights' rows: kv_down [kv_lora; rope], kv_up and q_up
    # heads x (their K and V rows; their qk and rope rows).
    for n, (_, lay, _) in want.items():
        if "kv_down" in n:
            assert named[n].shape == (kv_lora + rope, d)
        elif "kv_up" in n:
            assert named[n].shape == (heads * (qk + v), kv_lora)
        elif lay and lay.startswith("mla_q"):
            assert named[n].shape == (heads * (qk + rope), q_lora_rank or d)
    for n, p in named.items():
        out_proj = n.endswith(("linear_proj.weight", "linear_fc2.weight"))
        assert getattr(p, "mdopt_radius_scale", None) == (scale if out_proj else None), n
    # Per head with split_heads: q_up (or q) by its 4 heads; kv_up's K and V heads differ
    # in height (8 and 6 rows), so K and V stay split across heads.
    names = {p: n for n, p in named.items()}
    split = {names[p]: lay for p, lay in megatron_layouts(model, split_heads=True).items()}
    for n, (_, lay, _) in want.items():
        if lay and lay.startswith("mla_q"):
            assert split[n] == "blocks=rows:%d" % heads, n
        elif lay:
            assert split[n] == lay, n

    for batch in batches(3, seed=13):
        opt.zero_grad()
        backward(model, batch)
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0
                   for p in named.values())
        ok, _, _ = opt.step()
        assert ok
    assert opt.last_step.step == 3
    worst = 0.0
    for n, (_, lay, radius) in want.items():
        if radius is None:
            continue
        w = named[n].detach().double()
        blocks = _blocks_of(w, lay)
        radii = radius if isinstance(radius, list) else [radius] * len(blocks)
        assert len(radii) == len(blocks), n
        for b, r in zip(blocks, radii):
            worst = max(worst, abs(float(b.norm()) - r) / r)
    print("[ measured ] MLA GPT (q_lora_rank %s): matrices vs their radius, worst relative "
          "error %.2e" % (q_lora_rank, worst))
    assert worst < 1e-5
    rows = named["embedding.word_embeddings.weight"].detach().double().norm(dim=1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-5, atol=0)
