"""mdopt.megatron on a GPU: a Megatron-Core GPTModel with CUDA parameters wrapped in
Megatron's DistributedDataParallel (grad_reduce_in_fp32: float32 main_grad, also for bf16
weights), world size 1 on NCCL, stepped by MegatronMDOptimizer with Megatron's scheduler.

Each step is checked against mdopt.torch.MDOptimizer built by hand on an identical twin
(same groups and learning rates, reading main_grad): the same weights bit for bit (same
GPU, same kernels); the returned grad norm against float64; every block matrix
orthogonalized and projected; bf16 weights registered with float32 gradients; a NaN
main_grad skips the step. Skips without a GPU, without a CUDA build of libmdopt, or without
megatron-core (tested with 0.16.1)."""
import copy
import math
import os
import socket
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.normpath(os.path.join(os.path.dirname(__file__), "..")))

import mdopt  # noqa: E402

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU visible to torch %s: the Megatron adapter on a GPU is not tested"
                % torch.__version__, allow_module_level=True)
_ok, _why = mdopt.cuda_backend(0)
if not _ok:
    pytest.skip("libmdopt (%s) cannot run on CUDA: %s" % (mdopt.library_path, _why),
                allow_module_level=True)
try:
    import megatron.core  # noqa: F401
except ImportError:
    pytest.skip("megatron-core is not installed (pip install megatron-core==0.16.1): the "
                "Megatron-Core adapter on a GPU is not tested", allow_module_level=True)

import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.distributed import (DistributedDataParallel,  # noqa: E402
                                       DistributedDataParallelConfig)
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec  # noqa: E402
from megatron.core.models.gpt.gpt_model import GPTModel  # noqa: E402
from megatron.core.optimizer import OptimizerConfig  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

from helpers import report_metric  # noqa: E402
from mdopt.megatron import get_megatron_mdopt_optimizer  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402

VOCAB, SEQ, BATCH, LAYERS, LR = 128, 32, 4, 2, 0.01


@pytest.fixture(scope="module", autouse=True)
def megatron_gpu():
    started = not dist.is_initialized()
    if started:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:%d" % port, rank=0,
                                world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    yield
    parallel_state.destroy_model_parallel()
    if started:
        dist.destroy_process_group()


def make_model(dtype, seed=1):
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    cfg = TransformerConfig(num_layers=LAYERS, hidden_size=64, num_attention_heads=4,
                            hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype,
                            bf16=dtype == torch.bfloat16)
    model = GPTModel(config=cfg, transformer_layer_spec=get_gpt_layer_local_spec(),
                     vocab_size=VOCAB, max_sequence_length=SEQ).cuda()
    twin = copy.deepcopy(model)
    ddp = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                        use_distributed_optimizer=False)
    return (DistributedDataParallel(cfg, ddp, model), DistributedDataParallel(cfg, ddp, twin))


def batches(n, seed=7):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g, device="cuda"),
             torch.randint(0, VOCAB, (BATCH, SEQ), generator=g, device="cuda"))
            for _ in range(n)]


def forward_backward(model, batch):
    tokens, labels = batch
    pos = torch.arange(SEQ, device="cuda").unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool, device="cuda").tril().logical_not()
    model.zero_grad_buffer()
    model(tokens, pos, mask, labels=labels).float().mean().backward()
    model.finish_grad_sync()


def config(**kw):
    base = dict(optimizer="muon", lr=LR, min_lr=0.0, weight_decay=0.0, adam_beta1=0.9,
                adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.0, muon_momentum=0.95,
                muon_use_nesterov=True, muon_num_ns_steps=5, bf16=True)
    base.update(kw)
    return OptimizerConfig(**base)


def twin_groups(opt, twin):
    """MDOptimizer groups over the twin: the adapter's own groups, tensors matched by name."""
    by_name = dict(twin.module.named_parameters())
    out = []
    for g in opt.optimizer.param_groups:
        keys = {k: v for k, v in g.items() if k not in ("params", "names")}
        out.append(dict(keys, params=[by_name[n] for n in g["names"]], names=list(g["names"])))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_megatron_ddp_on_the_gpu_equals_mdoptimizer(dtype):
    model, twin = make_model(dtype)
    cfg = config()
    opt = get_megatron_mdopt_optimizer(cfg, [model.module])
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=LR, min_lr=0.0,
                                    lr_warmup_steps=0, lr_decay_steps=5,
                                    lr_decay_style="linear", start_wd=0.0, end_wd=0.0,
                                    wd_incr_steps=5, wd_incr_style="constant")
    ref = MDOptimizer(twin_groups(opt, twin), grad_attr="main_grad")
    assert opt.optimizer.device == torch.device("cuda", 0)
    # float32 main_grad: bf16 weights take their gradients in float32, not a bf16 copy.
    assert {e[2] for e in opt.optimizer._entries} == {mdopt._lib.DTYPE_F32}
    for a, b in zip(model.module.parameters(), twin.module.parameters()):
        assert torch.equal(a, b)
    worst = 0.0
    for t, batch in enumerate(batches(3)):
        forward_backward(model, batch)
        grads = [p.main_grad for p in model.module.parameters()]
        norm64 = math.sqrt(sum(float(g.double().square().sum()) for g in grads))
        ok, grad_norm, _ = opt.step()
        assert ok
        worst = max(worst, abs(grad_norm - norm64) / norm64)
        sched.step(increment=1)

        forward_backward(twin, batch)
        for g in ref.param_groups:  # the scheduler's place, as the adapter applies it
            g["lr"] = next(m["lr"] for m in opt.optimizer.param_groups
                           if m["name"] == g["name"])
        ref.step()
        torch.cuda.synchronize()
        for (n, a), b in zip(model.module.named_parameters(), twin.module.parameters()):
            assert torch.isfinite(a).all(), n
            assert torch.equal(a, b), "%s differs after step %d" % (n, t + 1)
    report_metric("python.megatron_cuda.grad_norm_%s" % str(dtype).split(".")[-1], worst, 1e-5)
    assert worst <= 1e-5
    # linear_proj, linear_fc1, linear_fc2 in matrix.0; linear_qkv's Q, K and V (4 heads, each
    # its own query group, kv_channels 16) three matrices each in their own group.
    info = opt.group_info("matrix.0")
    assert info.matrices == 3 * LAYERS and info.orthogonalized == 3 * LAYERS
    assert info.projected == 3 * LAYERS
    info = opt.group_info("matrix-groups4-16_16_16.0")
    assert info.matrices == 3 * LAYERS and info.orthogonalized == 3 * LAYERS
    assert info.projected == 3 * LAYERS

    # A NaN in Megatron's gradient buffer: the step is skipped, nothing changes.
    forward_backward(model, batches(1, seed=9)[0])
    model.module.decoder.layers[1].mlp.linear_fc1.weight.main_grad[0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    assert opt.step() == (False, None, None)
    for n, p in model.module.named_parameters():
        assert torch.equal(p, before[n]), n
