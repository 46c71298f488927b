"""Run under mpirun by test_checkpoint_sharded.py: one leg of a checkpointed run.

    ckpt_worker.py FRONT MODE STEPS CKPT_DIR IN OUT [PORT]

FRONT: torch (MDOptimizer on the helpers' MLP) or megatron (MegatronMDOptimizer on a tiny
Megatron-Core GPTModel, torch.distributed over gloo on PORT, data-parallel size = ranks).
MODE: save (train STEPS from the start, then checkpoint into CKPT_DIR: state_dict() with
state_dir, or sharded_state_dict with metadata["mdopt_state_dir"]); load (build with other
initial weights, load IN, train STEPS more); loadsave (load, train, save); full (train
STEPS, no checkpoint). Every rank
computes the gradient of the whole batch (grads=local: mdopt averages equal gradients), so
any rank count takes the steps of one rank up to float32 rounding. Rank 0 writes OUT
(weights, the state dict saved); every rank writes OUT.rank<r>.json (its pid and mdopt's
plan) for the open-tracing checks. threads=1 per rank."""
import contextlib
import ctypes
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import mdopt  # noqa: E402
from mdopt import _lib  # noqa: E402

front, mode, steps, ckdir, src, out = sys.argv[1:7]
steps = int(steps)
torch.set_num_threads(1)
try:
    comm = mdopt.comm.mpi()
except mdopt.MdoptError as e:
    if e.status == "MDOPT_UNSUPPORTED":
        print("mdopt: this libmdopt has no MPI communicator: %s" % e.message)
        sys.exit(77)
    raise
rank, size = comm.rank, comm.size
os.environ.pop("MDOPT_STATE_DIR", None)


def plan_json(core):
    need = ctypes.c_size_t()
    _lib.check(_lib.lib.mdopt_plan_json(core.handle, None, 0, ctypes.byref(need)))
    buf = ctypes.create_string_buffer(need.value)
    _lib.check(_lib.lib.mdopt_plan_json(core.handle, buf, need.value, None))
    return json.loads(buf.value.decode())


def refuses_default(opt_state_dict, who):
    """On several ranks a save without a directory is refused, on every rank, saying why."""
    if size == 1:
        return
    try:
        opt_state_dict()
    except RuntimeError as e:
        assert "node-local" in str(e) and who in str(e), str(e)
    else:
        raise AssertionError("%s saved on %d ranks without a directory" % (who, size))


def load_blob():
    return torch.load(src, weights_only=False)["saved"]


if front == "torch":
    from helpers import batch, mlp
    from mdopt.recipes import param_groups
    from mdopt.torch import MDOptimizer

    model = mlp(21 if not mode.startswith("load") else 77)
    opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), comm=comm,
                      threads=1)
    core = opt.mdopt
    first = 0
    if mode.startswith("load"):
        blob = load_blob()
        opt.load_state_dict(blob["opt"])
        first = blob["steps"]
    for t in range(first, first + steps):
        x, y = batch(100 + t)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    saved = None
    if mode.endswith("save"):
        refuses_default(opt.state_dict, "MDOptimizer.state_dict")
        opt.state_dir = ckdir
        saved = {"opt": opt.state_dict(), "steps": first + steps}
        assert saved["opt"]["mdopt"]["version"] == 2  # a reference, not the state
    weights = [p.detach().clone() for p in model.parameters()]
    last = opt.last_step.step
    if mode == "loadsave" and os.environ.get("MDOPT_OPEN_LOG"):
        # The save just made, loaded again at the same world size by a fresh optimizer; the
        # shim logs this marker's path first, splitting the log between the two loads.
        open(os.path.join(os.environ["MDOPT_OPEN_LOG"], "MARK-same-size-load"), "w").close()
        again = mlp(77)
        o2 = MDOptimizer(param_groups(again, matrix_preset="md-muon", lr=0.02), comm=comm,
                         threads=1)
        o2.load_state_dict(saved["opt"])
        assert all(torch.equal(a, b) for a, b in zip(again.parameters(), weights))
        assert all(o2.mdopt.get_state(k, "master") == core.get_state(k, "master")
                   for k in range(len(weights)))
        o2 = None
else:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core import utils as megatron_utils
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.gpt.gpt_model import GPTModel
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mdopt.megatron import SHARDED_KEY, get_megatron_mdopt_optimizer

    VOCAB, SEQ, BATCH = 64, 16, 2
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%s" % sys.argv[7],
                            rank=rank, world_size=size)
    parallel_state.initialize_model_parallel(1, 1)

    class _CPUMemoryBuffer(megatron_utils.GlobalMemoryBuffer):  # as test_megatron.py
        def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
            n = math.prod(tensor_shape)
            buf = self.buffer.get((name, dtype))
            if buf is None or buf.numel() < n:
                buf = self.buffer[(name, dtype)] = torch.empty(n, dtype=dtype)
            return buf[:n].view(*tensor_shape)

    parallel_state._GLOBAL_MEMORY_BUFFER = _CPUMemoryBuffer()
    tensor_parallel.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
    torch.manual_seed(4 if not mode.startswith("load") else 5)
    model = GPTModel(config=TransformerConfig(num_layers=2, hidden_size=32,
                                              num_attention_heads=4,
                                              use_cpu_initialization=True, hidden_dropout=0.0,
                                              attention_dropout=0.0),
                     transformer_layer_spec=get_gpt_layer_local_spec(), vocab_size=VOCAB,
                     max_sequence_length=SEQ)
    cfg = OptimizerConfig(optimizer="muon", lr=0.01, min_lr=0.0, weight_decay=0.1,
                          adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=0.0,
                          muon_momentum=0.95, muon_use_nesterov=True, muon_num_ns_steps=5)
    opt = get_megatron_mdopt_optimizer(cfg, [model], comm=comm, threads=1)
    core = opt.optimizer.mdopt
    sched = OptimizerParamScheduler(opt, init_lr=0.0, max_lr=0.01, min_lr=0.0,
                                    lr_warmup_steps=0, lr_decay_steps=10,
                                    lr_decay_style="linear", start_wd=0.1, end_wd=0.1,
                                    wd_incr_steps=10, wd_incr_style="constant")
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
             torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)) for _ in range(10)]
    pos = torch.arange(SEQ).unsqueeze(0).expand(BATCH, SEQ)
    mask = torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool).tril().logical_not()
    first = 0
    if mode.startswith("load"):
        blob = load_blob()
        template = opt.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                          metadata=None)
        assert template["mdopt"].key == SHARDED_KEY and template["mdopt"].data is None
        sched.load_state_dict(blob["sched"])
        opt.load_state_dict(blob["opt"])
        first = blob["steps"]
    for tokens, labels in data[first:first + steps]:
        opt.zero_grad()
        model(tokens, pos, mask, labels=labels).mean().backward()
        ok, _, _ = opt.step()
        assert ok
        sched.step(increment=1)
    saved = None
    if mode.endswith("save"):
        refuses_default(lambda: opt.sharded_state_dict(model.sharded_state_dict()),
                        "MegatronMDOptimizer.sharded_state_dict")
        sharded = opt.sharded_state_dict(model.sharded_state_dict(),
                                         metadata={"mdopt_state_dir": ckdir})
        obj = sharded["mdopt"]
        assert isinstance(obj, ShardedObject) and obj.key == SHARDED_KEY
        assert obj.global_shape == (1,) and obj.global_offset == (0,)
        assert obj.replica_id == (0, 0, rank)  # data-parallel rank 0 writes it
        assert len(repr(obj.data)) < 2000  # a reference, not the state
        # What dist_checkpointing.load hands back: each ShardedObject replaced by its data.
        saved = {"opt": dict(sharded, mdopt=obj.data), "sched": sched.state_dict(),
                 "steps": first + steps}
    weights = [p.detach().clone() for p in model.parameters()]
    if mode == "save":  # then on without stopping: the run a resumed one must match
        for tokens, labels in data[first + steps:first + 2 * steps]:
            opt.zero_grad()
            model(tokens, pos, mask, labels=labels).mean().backward()
            assert opt.step()[0]
            sched.step(increment=1)
        saved["continued"] = [p.detach().clone() for p in model.parameters()]
    last = opt.last_step.step

with open("%s.rank%d.json" % (out, rank), "w") as f:
    json.dump({"rank": rank, "pid": os.getpid(), "plan": plan_json(core)}, f)
if rank == 0:
    torch.save({"weights": weights, "saved": saved, "size": size, "step": last}, out)
opt = core = None
if front == "megatron":
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
comm.close()
print("rank %d of %d: ok" % (rank, size))
