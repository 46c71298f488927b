"""mdopt behind Megatron-Core's optimizer interface (megatron.core.optimizer.MegatronOptimizer).

    from mdopt.megatron import get_megatron_mdopt_optimizer
    optimizer = get_megatron_mdopt_optimizer(optimizer_config, model_chunks, threads=2)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=..., min_lr=..., ...)
    ...
    update_successful, grad_norm, num_zeros_in_grad = optimizer.step()
    if update_successful: scheduler.step(increment=1)

Written against megatron-core 0.16.1 (the newest release that installs on Python 3.11; its
optimizer module imports and runs on the CPU). Every tensor is registered with one
mdopt.torch.MDOptimizer, which is `self.optimizer`. Megatron's own parameter groups (built
by megatron.core.optimizer._get_param_groups from the config and config_overrides, so
wd_mult, max_lr/min_lr and decoupled_lr behave as in get_megatron_optimizer) are what
`param_groups` shows, and what OptimizerParamScheduler writes lr and weight_decay into.
Each is split by the tensor's role into mdopt groups named "<role>.<index>":

    matrix     2-D weights of the transformer          config.optimizer "muon" -> md-muon,
                                                        "adam" -> md-adamw
    embedding  word/position embeddings                embedding (rows on the unit sphere)
    output     the LM head (output_layer.weight)       embedding with row and column gains
                                                        (gains=rowcol), lr 1e-3
    router     MoE routers (".router." in the name)    router
    vector     1-D tensors (norms, biases)             vector

as the method does (matrices on their sphere with row and column gains, the output
projections linear_proj and linear_fc2 on a sphere shrunk by 1/sqrt(2 num_layers) --
scale_out_proj_radius=False turns that off --; embeddings and the
LM head with unit-norm rows and fixed Adam learning rates, an untied LM head with row and
column gains as well (a head tied to the embedding is the embedding's parameter and takes
its group; spec={"output": {"gains": "none"}} turns the head's gains off); gains, norms and biases with
Adam). `presets=`, `lrs=` and `spec=` change this per role.

Fused weights are found from the modules and their config (megatron_layouts) and split
into their logical matrices, each with its own sphere and Newton-Schulz (the column and
scalar gains shared by the blocks, the row gains per row), as the method's authors split
them: a gated MLP's linear_fc1 ([gate; up]: dense MLPs, shared experts, every expert) with
blocks=rows:2; linear_qkv into Q, K and V (and the output gate's heads with
attention_output_gate), each across all query groups (blocks=groups:G:...); MLA's
linear_kv_up_proj into K and V across heads, and linear_kv_down_proj into its
[kv_lora_rank; qk_pos_emb_head_dim] rows. Each distinct blocks= value gets an mdopt group of
its own ("matrix-rows2.<index>", "matrix-groups2-16_8_8.<index>"). split_heads=True makes
every attention head a block instead. Megatron's legacy GroupedMLP (every expert's fc1 and
fc2 stored transposed, side by side in one weight1 and one weight2) is refused: mdopt
cannot register its experts apart.

Learning rates: the matrix and router groups take their Megatron group's max_lr (config.lr);
embedding, output and vector groups take their fixed learning rate (`lrs`, default 3e-3,
1e-3 and 1e-3), or their Megatron group's max_lr when an override (decoupled_lr) gave it
one. At every step each mdopt group's lr is that base times its Megatron group's
lr / max_lr, so Megatron's warmup and decay shape every group alike, gains included (mdopt
scales gain_lr with lr).

Weight decay: mdopt groups on a sphere have none (the sphere fixes the norm); groups without
one (vector, and muon/adamw presets) get config.weight_decay * wd_mult, fixed when the
optimizer is built: a scheduler that changes it (wd_incr_style other than constant) is
refused at the next step rather than ignored.

Devices: the optimizer runs where the parameters are (mdopt.torch.MDOptimizer): on the CPU,
or on the GPU of this rank (device=cuda:K, ordered on torch's current stream). Gradients
are read from param.main_grad where Megatron's DDP keeps them (float32 with
grad_reduce_in_fp32, also for bf16 weights: registered as float32 gradients, no copy), else
from param.grad. Under Megatron's DDP the gradients are already averaged over the
data-parallel ranks: pass grads="reduced" with a communicator over those ranks (e.g.
comm=mdopt.comm.nccl(parallel_state.get_data_parallel_group())); without DDP, grads="local"
lets mdopt reduce-scatter them. step() asks mdopt for the step's outcome (whether a NaN/Inf
skipped it), so it waits for the GPU once per step, as Megatron's own optimizers do for
their found-inf check.

Not supported (refused with a message): fp16 and loss scaling, Megatron's distributed
optimizer (mdopt shards its own state), precision-aware optimizer and CPU offload, tensor
parallelism (mdopt would put each shard on its own sphere), muon_extra_scale_factor != 1,
the legacy GroupedMLP (use TEGroupedMLP or SequentialMLP).
"""

import io
import math
import os

import torch

try:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig
    from megatron.core.optimizer import _get_param_groups
    from megatron.core.transformer.module import param_is_not_shared
except ImportError as e:  # pragma: no cover - exercised only without megatron-core
    raise ImportError("mdopt.megatron needs megatron-core (tested with 0.16.1: "
                      "pip install megatron-core==0.16.1): %s" % e) from e

from . import checkpoint_ref as _ckref
from .recipes import _blocks_tag
from .torch import MDOptimizer

MEGATRON_CORE_TESTED = "0.16.1"

ROLES = ("matrix", "embedding", "output", "router", "vector")
# The method's recipe per role; "matrix" is filled from config.optimizer.
DEFAULT_PRESETS = {"embedding": "embedding", "output": "embedding", "router": "router",
                   "vector": "vector"}
MATRIX_PRESETS = {"muon": "md-muon", "adam": "md-adamw"}
# Spec keys a role gets over its default preset (not over one given in presets=): the
# untied LM head carries row and column gains, as in the method's code.
DEFAULT_SPECS = {"output": {"gains": "rowcol"}}
# Roles whose base lr is fixed (the paper holds them while sweeping the matrix lr).
DEFAULT_LRS = {"embedding": 3e-3, "output": 1e-3, "vector": 1e-3}
# Presets by their base optimizer and sphere (docs/ABI.md, "Group specs").
_MUON_PRESETS = {"md-muon", "muon", "muonh", "router"}
_FLAT_PRESETS = {"muon", "adamw", "vector"}  # no sphere
_STATE_FORMAT = "mdopt-megatron-state"
SHARDED_KEY = "optimizer.mdopt.state"


def _is_out_proj(name):
    """An attention or MLP output projection (Megatron's linear_proj, linear_fc2)."""
    return name.endswith(("linear_proj.weight", "linear_fc2.weight"))


def megatron_role(name, param):
    """The role of a Megatron parameter: matrix, embedding, output, router or vector."""
    if param.dim() <= 1:
        return "vector"
    if name.endswith("output_layer.weight"):
        return "output"
    if getattr(param, "is_embedding_or_output_parameter", False) or "embedding" in name:
        return "embedding"
    if ".router." in name or name.startswith("router."):
        return "router"
    return "matrix"


def _layout_of_module(mod, split_heads=False):
    """{param: layout} for the fused projections of one Megatron module (see megatron_layouts)."""
    cfg = getattr(mod, "config", None)
    if cfg is None:
        return {}
    out = {}

    def weights(sub):
        if sub is None:
            return []
        return [p for n, p in sub.named_parameters(recurse=False)
                if n.startswith("weight") and p.dim() >= 2]

    fc1 = getattr(mod, "linear_fc1", None)
    if fc1 is not None and getattr(cfg, "gated_linear_unit", False):
        # MLP, SharedExpertMLP, each expert of SequentialMLP: [gate; up] stacked by rows;
        # TEGroupedMLP: one such weight per expert (weight0, weight1, ...).
        for p in weights(fc1):
            out[p] = "blocks=rows:2"
    qkv = getattr(mod, "linear_qkv", None)
    if qkv is not None and getattr(cfg, "num_attention_heads", None):
        heads = cfg.num_attention_heads
        groups = cfg.num_query_groups or heads
        q = heads // groups
        dim = cfg.kv_channels
        # Per query group, linear_qkv's output rows are its q query heads, with
        # attention_output_gate then its q gate heads, then its key head and its value head
        # (Megatron-Core's SelfAttention.get_query_key_value_tensors splits each group's
        # rows as [query, gate, key, value]).
        gated = getattr(cfg, "attention_output_gate", False)
        pieces = [q * dim] + ([q * dim] if gated else []) + [dim, dim]
        for p in weights(qkv):
            if p.shape[0] != groups * sum(pieces):  # not the whole weight: kept whole
                out[p] = "qkv=groups:%d,q:%d%s,k:1,v:1 head_dim:%d" % (
                    groups, q, ",gate:%d" % q if gated else "", dim)
            elif split_heads:
                out[p] = "blocks=rows:%d" % (groups * sum(pieces) // dim)
            else:  # Q, (gate,) K and V, each across all query groups
                out[p] = "blocks=groups:%d:%s" % (groups, ",".join(map(str, pieces)))
    w1, w2 = getattr(mod, "weight1", None), getattr(mod, "weight2", None)
    experts = getattr(mod, "num_local_experts", None)
    if fc1 is None and experts and isinstance(w1, torch.Tensor) and \
            isinstance(w2, torch.Tensor) and w1.dim() == 2 and w2.dim() == 2:
        # Megatron's legacy GroupedMLP: weight1 is hidden x (E * fc1 width), every expert's
        # fc1 stored transposed (input x output; [gate | up] as column halves with a GLU),
        # weight2 (E * ffn) x hidden, every expert's fc2 transposed. Reported; the optimizer
        # refuses it (MegatronMDOptimizer).
        ffn = w2.shape[0] // experts
        glu = ",gate:%d,up:%d" % (ffn, ffn) if getattr(cfg, "gated_linear_unit", False) \
            else ",ffn:%d" % ffn
        out[w1] = "grouped_fc1=experts:%d%s transposed" % (experts, glu)
        out[w2] = "grouped_fc2=experts:%d,ffn:%d transposed" % (experts, ffn)
    heads = getattr(cfg, "num_attention_heads", None)
    if getattr(mod, "linear_kv_up_proj", None) is not None and heads:
        q_head = cfg.qk_head_dim + cfg.qk_pos_emb_head_dim
        # q_up (or q): whole by default, per head with split_heads.
        for sub, key in (("linear_q_up_proj", "mla_q_up"), ("linear_q_proj", "mla_q")):
            for p in weights(getattr(mod, sub, None)):
                out[p] = "blocks=rows:%d" % heads if split_heads and \
                    p.shape[0] == heads * q_head else "%s=heads:%d,rows:%d" % (key, heads, q_head)
        # kv_up: per head its qk_head_dim K rows, then its v_head_dim V rows; K and V each
        # across all heads (per head with split_heads, when K and V heads are of one height).
        qk, v = cfg.qk_head_dim, cfg.v_head_dim
        for p in weights(mod.linear_kv_up_proj):
            if p.shape[0] != heads * (qk + v):
                out[p] = "mla_kv_up=heads:%d,k:%d,v:%d" % (heads, qk, v)
            elif split_heads and qk == v:
                out[p] = "blocks=rows:%d" % (2 * heads)
            else:
                out[p] = "blocks=groups:%d:%d,%d" % (heads, qk, v)
        # kv_down: [kv_lora_rank rows; qk_pos_emb_head_dim rows], two contiguous blocks.
        lora, rope = cfg.kv_lora_rank, cfg.qk_pos_emb_head_dim
        for p in weights(getattr(mod, "linear_kv_down_proj", None)):
            if rope > 0 and p.shape[0] == lora + rope:
                out[p] = "blocks=groups:1:%d,%d" % (lora, rope)
            else:
                out[p] = "mla_kv_down=rows:%d,%d" % (lora, rope)
        # FusedMLASelfAttention (newer megatron-core) fuses q_down and kv_down into one
        # linear_qkv_down_proj: [q_lora_rank rows; kv_lora_rank rows; qk_pos_emb_head_dim
        # rows], three contiguous blocks.
        q_lora = getattr(cfg, "q_lora_rank", None) or 0
        for p in weights(getattr(mod, "linear_qkv_down_proj", None)):
            if q_lora > 0 and rope > 0 and p.shape[0] == q_lora + lora + rope:
                out[p] = "blocks=groups:1:%d,%d,%d" % (q_lora, lora, rope)
            else:
                out[p] = "mla_qkv_down=rows:%d,%d,%d" % (q_lora, lora, rope)
    return out


def megatron_layouts(model_chunks, split_heads=False):
    """The logical blocks of every fused weight of Megatron-Core model chunks, found from the
    modules and their TransformerConfig: {param: layout}.

        blocks=rows:2                     linear_fc1 of a gated MLP (gated_linear_unit): the
                                          gate and up projections stacked by rows; dense MLPs,
                                          shared experts, every expert (SequentialMLP and
                                          TEGroupedMLP).
        blocks=groups:G:qD,D,D            linear_qkv (G = num_query_groups, q query heads per
        blocks=groups:G:qD,qD,D,D         group, D = kv_channels): per query group its q
                                          query heads, with attention_output_gate its q gate
                                          heads, one key and one value head; blocks Q, (gate,)
                                          K and V, each across all query groups.
        blocks=groups:H:qk_head_dim,v_head_dim
                                          MLA's linear_kv_up_proj: per head its K rows, then
                                          its V rows; blocks K and V across the H heads.
        blocks=groups:1:kv_lora_rank,qk_pos_emb_head_dim
                                          MLA's linear_kv_down_proj: two contiguous blocks.
        blocks=groups:1:q_lora_rank,kv_lora_rank,qk_pos_emb_head_dim
                                          the fused MLA's linear_qkv_down_proj (q_down and
                                          kv_down in one weight): three contiguous blocks.
        mla_q_up=heads:H,rows:R / mla_q=heads:H,rows:R
                                          MLA's linear_q_up_proj (linear_q_proj without
                                          q_lora_rank): H heads of qk + rope rows; one matrix.
        grouped_fc1=experts:E,gate:F,up:F transposed (ffn:F without a GLU)
        grouped_fc2=experts:E,ffn:F transposed
                                          weight1 and weight2 of the legacy GroupedMLP:
                                          each expert's matrix stored input x output, the
                                          E experts side by side. MegatronMDOptimizer
                                          refuses a model that has one.

    The blocks=... values are spec keys: MegatronMDOptimizer registers those weights with
    them, each block its own matrix (sphere, Newton-Schulz; column and scalar gains shared).
    Any other value is reported and the weight stays one matrix: besides MLA's q_up/q, a
    linear_qkv or MLA weight whose rows do not add up to its layout (qkv=..., mla_kv_up=...,
    mla_kv_down=..., mla_qkv_down=...). With `split_heads`, every attention head is a block of its own
    instead (the per-head splitting the method's authors offer as an option): linear_qkv
    blocks=rows:<heads in it> (query, gate, key and value heads), linear_q_up_proj (or
    linear_q_proj) blocks=rows:H, and linear_kv_up_proj blocks=rows:2H when qk_head_dim ==
    v_head_dim (each head's K rows, then its V rows; else K and V across heads as above)."""
    if not isinstance(model_chunks, (list, tuple)):
        model_chunks = [model_chunks]
    out = {}
    for chunk in model_chunks:
        for _, mod in chunk.named_modules():
            out.update(_layout_of_module(mod, split_heads))
    return out


def _blocks_numbers(blocks):
    """rows:K -> (K,); groups:G:h0,h1,... -> (G, h0, h1, ...)."""
    rest = blocks.partition(":")[2]
    return tuple(int(x) for x in rest.replace(":", ",").split(","))


def _blocks_order(blocks):
    """The order of a role's groups: the whole matrices, then rows:K by K, then groups:G:...
    by G and heights."""
    if blocks is None:
        return (0, ())
    return (1 if blocks.startswith("rows:") else 2, _blocks_numbers(blocks))


def _refuse_grouped_mlp(layouts, names):
    """Megatron's legacy GroupedMLP cannot be registered as its experts: refuse it, naming
    the module and what to use instead."""
    found = sorted({names.get(p, "?").rsplit(".", 1)[0] for p, lay in layouts.items()
                    if lay.startswith("grouped_fc1=") and p.requires_grad})
    if not found:
        return
    w1 = next(p for p, lay in layouts.items() if lay.startswith("grouped_fc1=") and
              names.get(p, "?").rsplit(".", 1)[0] == found[0])
    lay = layouts[w1]
    experts = int(lay.split("experts:")[1].split(",")[0])
    glu = ",gate:" in lay
    raise ValueError(
        "mdopt.megatron: %s%s is Megatron's legacy GroupedMLP (moe_grouped_gemm=True with the "
        "local layer spec, or moe_use_legacy_grouped_gemm=True): its weight1 (%d x %d) holds "
        "the fc1 of all %d experts transposed (input x output) side by side%s, and weight2 "
        "their fc2, which mdopt cannot register as separate matrices (its matrices and "
        "blocks are row ranges of output x input weights): it would put every expert%s on "
        "one sphere and orthogonalize them together. Build the experts as TEGroupedMLP "
        "(moe_grouped_gemm=True with the Transformer Engine layer spec and "
        "moe_use_legacy_grouped_gemm=False) or SequentialMLP (moe_grouped_gemm=False)"
        % (found[0], " (and %d more)" % (len(found) - 1) if len(found) > 1 else "",
           w1.shape[0], w1.shape[1], experts,
           ", each one's gate and up as column halves" if glu else "",
           " and its gate and up halves" if glu else ""))


def _check_config(config):
    if config.lr is None:
        raise ValueError("mdopt.megatron: OptimizerConfig.lr is not set (it is the matrix "
                         "groups' peak learning rate)")
    refused = [("fp16", "fp16 needs a loss scaler, which mdopt has not; use bf16 or fp32"),
               ("use_distributed_optimizer",
                "mdopt shards its own state over its communicator; set "
                "use_distributed_optimizer=False"),
               ("use_precision_aware_optimizer", "mdopt keeps its own f32 state"),
               ("optimizer_cpu_offload", "mdopt's state already lives where it runs")]
    for key, why in refused:
        if getattr(config, key, False):
            raise ValueError("mdopt.megatron: OptimizerConfig.%s=True is not supported: %s"
                             % (key, why))
    if config.loss_scale:
        raise ValueError("mdopt.megatron: OptimizerConfig.loss_scale is not supported "
                         "(mdopt has no loss scaling)")
    if getattr(config, "muon_extra_scale_factor", 1.0) != 1.0:
        raise ValueError("mdopt.megatron: muon_extra_scale_factor=%r has no mdopt "
                         "equivalent; scale the lr instead" % config.muon_extra_scale_factor)


def _spec_for(role, preset, config, wd_mult, spec):
    """The mdopt spec keys of one role's group from the Megatron config."""
    keys = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_eps}
    base = spec.get("base", "muon" if preset in _MUON_PRESETS else "adamw")
    if base == "muon":
        keys.update(momentum=config.muon_momentum, nesterov=bool(config.muon_use_nesterov),
                    ns_steps=int(config.muon_num_ns_steps))
    flat = spec.get("sphere", "none" if preset in _FLAT_PRESETS else "sphere") == "none"
    if flat:
        keys["weight_decay"] = float(config.weight_decay) * float(wd_mult)
    keys.update(spec)
    if "beta1" in keys or "beta2" in keys:
        keys.pop("betas")
    return keys, flat


class MegatronMDOptimizer(MegatronOptimizer):
    """A MegatronOptimizer whose step is mdopt's (see the module's docstring).

    config: megatron.core.optimizer.OptimizerConfig (lr, weight_decay, adam_beta1/2,
        adam_eps, muon_momentum, muon_use_nesterov, muon_num_ns_steps, clip_grad,
        log_num_zeros_in_grad, bf16; `optimizer` "muon" or "adam" picks the matrix preset).
    model_chunks: the MegatronModule(s) of this pipeline stage.
    config_overrides: as for get_megatron_optimizer (None: no weight decay on biases and
        1-D tensors, decoupled_lr on embeddings and the output layer).
    presets: {role: preset} over the defaults (e.g. {"matrix": "muon"} for plain Muon).
    lrs: {role: lr} base learning rates of the embedding, output and vector roles.
    spec: {role: {spec key: value}} extra mdopt spec keys (e.g. {"matrix": {"gains": "row"}}).
    split_heads: every attention head of linear_qkv (and of MLA's q_up/kv_up) a matrix of its
        own (megatron_layouts); by default linear_qkv is split into Q, (gate,) K and V across
        query groups, MLA's kv_up into K and V across heads, and q_up stays one matrix.
    scale_out_proj_radius: the output projections of attention and MLP (linear_proj,
        linear_fc2) of a matrix group on a sphere get radius_scale 1/sqrt(2 num_layers)
        (their sphere shrunk as Megatron's scaled init shrinks them, as the method's code
        does with hypersphere_scale_out_proj_init); False keeps every radius as the spec
        says. No effect with radius=init.
    comm, options and keyword arguments (threads=2, kernels="reference", ...): as for
        mdopt.torch.MDOptimizer.
    """

    def __init__(self, config, model_chunks, config_overrides=None, *, presets=None,
                 lrs=None, spec=None, comm=None, options="", split_heads=False,
                 scale_out_proj_radius=True,
                 **mdopt_kwargs):
        if not isinstance(config, OptimizerConfig):
            raise TypeError("mdopt.megatron: config must be a megatron.core.optimizer."
                            "OptimizerConfig, not %r" % type(config).__name__)
        _check_config(config)
        if not isinstance(model_chunks, (list, tuple)):
            model_chunks = [model_chunks]
        if parallel_state.model_parallel_is_initialized() and \
                parallel_state.get_tensor_model_parallel_world_size() > 1:
            raise ValueError(
                "mdopt.megatron: tensor parallelism (TP=%d) is not supported: each rank "
                "holds a shard of every matrix and mdopt would put each shard on its own "
                "sphere and orthogonalize it alone" %
                parallel_state.get_tensor_model_parallel_world_size())
        presets = dict(presets or {})
        for role in list(presets) + list(lrs or {}) + list(spec or {}):
            if role not in ROLES:
                raise ValueError("mdopt.megatron: unknown role '%s' (roles: %s)"
                                 % (role, ", ".join(ROLES)))
        matrix_preset = presets.get("matrix") or MATRIX_PRESETS.get(config.optimizer)
        if matrix_preset is None:
            raise ValueError("mdopt.megatron: OptimizerConfig.optimizer=%r has no mdopt "
                             "preset (muon -> md-muon, adam -> md-adamw); pass "
                             "presets={'matrix': ...}" % config.optimizer)
        self._presets = dict(DEFAULT_PRESETS, **presets)
        self._presets["matrix"] = matrix_preset
        self._lrs = dict(DEFAULT_LRS, **(lrs or {}))
        self._spec = {r: dict(s) for r, s in (spec or {}).items()}
        out_proj_scale = 1.0
        if scale_out_proj_radius:
            layers = getattr(getattr(model_chunks[0], "config", None), "num_layers", None)
            if not layers:
                raise ValueError("mdopt.megatron: scale_out_proj_radius needs the model's "
                                 "config.num_layers; pass scale_out_proj_radius=False")
            out_proj_scale = 1.0 / math.sqrt(2.0 * layers)
        for r, s in DEFAULT_SPECS.items():
            if self._presets[r] == DEFAULT_PRESETS[r]:
                self._spec[r] = dict(s, **self._spec.get(r, {}))

        # The fused weights' logical blocks, from the modules and their configs.
        self._layouts = megatron_layouts(list(model_chunks), split_heads=bool(split_heads))
        names = {}
        for ci, chunk in enumerate(model_chunks):
            for n, p in chunk.named_parameters():
                names.setdefault(p, n if len(model_chunks) == 1 else "chunk%d.%s" % (ci, n))
        _refuse_grouped_mlp(self._layouts, names)
        # Megatron's groups: the same as get_megatron_optimizer builds (wd_mult, max_lr...),
        # expert-parallel ones included (one mdopt optimizer serves them all).
        megatron_groups = _get_param_groups(list(model_chunks), config, config_overrides)
        mdopt_kwargs = dict(comm=comm, options=options, **mdopt_kwargs)
        self._mdopt_args = (self._build_groups(megatron_groups, config, names, out_proj_scale),
                            mdopt_kwargs)
        self._load_dir = None  # sharded_state_dict(is_loading=True)'s mdopt_state_dir
        mdopt = self._make_mdopt()
        super().__init__(mdopt, config, init_state_fn=lambda *a: None)
        self.is_stub_optimizer = False

    def _build_groups(self, megatron_groups, config, names, out_proj_scale):
        """Megatron's groups (self._megatron_groups) and the mdopt groups they split into by
        role and blocks= layout (self._mdopt_args[0], self._links)."""
        self._megatron_groups = []
        mdopt_groups = []
        self._links = []  # per mdopt group: (megatron group index, base lr, flat, role)
        for gi, mg in enumerate(megatron_groups):
            params = list(mg["params"])
            if not params:
                continue
            max_lr = mg.get("max_lr", config.lr)
            by_role = {}
            for p in params:
                by_role.setdefault(megatron_role(names.get(p, ""), p), []).append(p)
            mi = len(self._megatron_groups)
            for role in ROLES:
                if role not in by_role:
                    continue
                preset = self._presets[role]
                keys, flat = _spec_for(role, preset, config, mg.get("wd_mult", 1.0),
                                       self._spec.get(role, {}))
                if role in ("matrix", "router") or max_lr != config.lr:
                    base_lr = float(max_lr)
                else:
                    base_lr = float(self._lrs[role])
                if role == "matrix" and not flat and keys.get("radius") != "init":
                    for p in by_role[role]:  # depth-scaled spheres of the output projections
                        if _is_out_proj(names.get(p, "")) and out_proj_scale != 1.0:
                            p.mdopt_radius_scale = out_proj_scale
                        elif hasattr(p, "mdopt_radius_scale"):
                            del p.mdopt_radius_scale
                # Matrices by their blocks: a group per distinct blocks= layout
                # ("matrix-rows2.0", "matrix-groups2-16_8_8.0"), the others in "matrix.0".
                split = {}
                for p in by_role[role]:
                    # A blocks key the caller gave (spec=) applies to the whole role.
                    lay = self._layouts.get(p, "") if role == "matrix" and \
                        "blocks" not in keys else ""
                    blocks = lay[len("blocks="):] if lay.startswith("blocks=") else None
                    split.setdefault(blocks, []).append(p)
                for blocks in sorted(split, key=_blocks_order):
                    ps = split[blocks]
                    extra = {} if blocks is None else {"blocks": blocks}
                    suffix = "" if blocks is None else "-" + _blocks_tag(blocks)
                    mdopt_groups.append(dict(keys, params=ps, preset=preset, lr=base_lr,
                                             name="%s%s.%d" % (role, suffix, mi),
                                             names=[names.get(p, "") for p in ps], **extra))
                    self._links.append((mi, base_lr, flat, role))
            group = {k: v for k, v in mg.items() if k != "params"}
            group["params"] = params
            group.setdefault("lr", max_lr)
            group.setdefault("max_lr", max_lr)
            group.setdefault("weight_decay",
                             float(config.weight_decay) * float(mg.get("wd_mult", 1.0)))
            self._megatron_groups.append(group)
        if not mdopt_groups:
            raise ValueError("mdopt.megatron: the model chunks have no trainable parameters")
        self._built_wd = [mg["weight_decay"] for mg in self._megatron_groups]
        return mdopt_groups

    @property
    def layouts(self):
        """{param name: layout} of every fused weight found (megatron_layouts): those of the
        form blocks=... are the spec key each was registered with; the others stay one
        matrix."""
        names = {}
        for g in self._mdopt_args[0]:
            names.update(zip(g["params"], g["names"]))
        return {names[p]: lay for p, lay in self._layouts.items() if p in names}

    def _make_mdopt(self):
        groups, kwargs = self._mdopt_args
        fresh = [dict(g, params=list(g["params"]), names=list(g["names"])) for g in groups]
        kwargs = dict(kwargs)
        kwargs.setdefault("grad_attr", "main_grad")  # Megatron DDP's; .grad where absent
        return MDOptimizer(fresh, **kwargs)

    # --- what Megatron reads and writes -------------------------------------------------

    @property
    def param_groups(self):
        """Megatron's groups (lr, weight_decay, max_lr, min_lr, wd_mult, ...): the
        scheduler writes lr and weight_decay here; step() passes them on to mdopt."""
        return self._megatron_groups

    @param_groups.setter
    def param_groups(self, value):
        self._megatron_groups = value

    def mdopt_groups(self):
        """(mdopt group name, role, Megatron group index) of every mdopt group."""
        return [(g["name"], link[3], link[0])
                for g, link in zip(self.optimizer.param_groups, self._links)]

    def _device(self):
        return self._megatron_groups[0]["params"][0].device

    def get_loss_scale(self):
        """No loss scaling: a 1-element tensor holding 1, on the parameters' device."""
        return torch.ones(1, dtype=torch.float32, device=self._device())

    def zero_grad(self, set_to_none=True):
        for p in self.get_parameters():
            for attr in ("grad", "main_grad"):
                g = getattr(p, attr, None)
                if g is None:
                    continue
                if attr == "grad" and set_to_none:
                    p.grad = None
                else:
                    if g.grad_fn is not None:
                        g.detach_()
                    else:
                        g.requires_grad_(False)
                    g.zero_()

    # --- gradient statistics on any device (Megatron's own helpers allocate on CUDA) ---

    def _all_reduce(self, t, op):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=op, group=self.get_grad_stats_parallel_group())
        return t

    @staticmethod
    def _grad(p):
        """A parameter's gradient: main_grad where Megatron's DDP keeps it, else .grad."""
        g = getattr(p, "main_grad", None)
        return p.grad if g is None else g

    def _stats_grads(self):
        tp = getattr(self, "tp_group", None)
        out = []
        for p in self.get_parameters():
            g = self._grad(p)
            if g is None or not param_is_not_shared(p):
                continue
            if not tensor_parallel.param_is_not_tensor_parallel_duplicate(p, tp):
                continue
            out.append(g)
        return out

    @torch.no_grad()
    def get_grad_norm(self):
        """Global L2 norm of the gradients (shared and TP-duplicate tensors counted once),
        computed in float32 like Megatron's get_grad_norm_fp32."""
        grads = self._stats_grads()
        sq = torch.zeros(1, dtype=torch.float32, device=self._device())
        for g in grads:
            sq += g.detach().float().square().sum()
        self._all_reduce(sq, torch.distributed.ReduceOp.SUM)
        return sq.item() ** 0.5

    @torch.no_grad()
    def clip_grad_norm(self, clip_grad):
        """Megatron's semantics: returns the norm before clipping and scales every gradient
        by clip_grad / (norm + 1e-6) when that is below 1 (mdopt itself does not clip)."""
        norm = self.get_grad_norm()
        coeff = clip_grad / (norm + 1.0e-6)
        if coeff < 1.0:  # False for a NaN/Inf norm: mdopt then skips the step
            grads = [g for g in map(self._grad, self.get_parameters()) if g is not None]
            torch._foreach_mul_(grads, coeff)
        return norm

    @torch.no_grad()
    def count_zeros(self):
        total = torch.zeros(1, dtype=torch.float64, device=self._device())
        for g in self._stats_grads():
            total += g.numel() - torch.count_nonzero(g)
        self._all_reduce(total, torch.distributed.ReduceOp.SUM)
        return total.item()

    # --- the step -----------------------------------------------------------------------

    @torch.no_grad()
    def prepare_grads(self):
        """Nothing to prepare: mdopt reads param.main_grad (Megatron's DDP) where it exists,
        else param.grad, in place. Returns False: mdopt itself finds NaN/Inf and skips
        (step_with_ready_grads)."""
        return False

    def _push_lrs(self):
        for gi, mg in enumerate(self._megatron_groups):
            wd = float(mg.get("weight_decay", self._built_wd[gi]))
            flat_links = [l for l in self._links if l[0] == gi and l[2]]
            if flat_links and not math.isclose(wd, self._built_wd[gi], rel_tol=1e-12,
                                                abs_tol=1e-15):
                raise RuntimeError(
                    "mdopt.megatron: param group %d's weight_decay changed from %r to %r; "
                    "mdopt fixes it when the optimizer is built (use wd_incr_style="
                    "'constant', or a sphere preset, which has none)"
                    % (gi, self._built_wd[gi], wd))
        for g, (gi, base_lr, _, _) in zip(self.optimizer.param_groups, self._links):
            mg = self._megatron_groups[gi]
            max_lr = float(mg.get("max_lr") or 0.0)
            lr = float(mg["lr"])
            # lr / max_lr is where the schedule is (warmup, decay); max_lr 0 means no steps.
            g["lr"] = base_lr * (lr / max_lr) if max_lr > 0 else 0.0

    @torch.no_grad()
    def step_with_ready_grads(self):
        """One mdopt step with the scheduled learning rates; False when mdopt skipped it
        (NaN/Inf in a gradient: nothing changed)."""
        self._push_lrs()
        self.optimizer.step(info=True)  # the outcome: one wait for the GPU per step
        return not self.optimizer.last_step.skipped

    @torch.no_grad()
    def step(self):
        """(update_successful, grad_norm, num_zeros_in_grad) as Megatron's optimizers
        return: (False, None, None) for a skipped step; grad_norm is the norm before
        clipping (mdopt's measured norm when clip_grad is 0)."""
        if self.prepare_grads():
            return False, None, None
        grad_norm = None
        if self.config.clip_grad > 0.0:
            grad_norm = self.clip_grad_norm(self.config.clip_grad)
        num_zeros = self.count_zeros() if self.config.log_num_zeros_in_grad else None
        if not self.step_with_ready_grads():
            return False, None, None
        if grad_norm is None:
            grad_norm = self.optimizer.last_step.grad_norm
        return True, grad_norm, num_zeros

    @property
    def last_step(self):
        """mdopt's telemetry of the last step (step, skipped, grad_norm, seconds, ...)."""
        return self.optimizer.last_step

    def group_info(self, name):
        """mdopt_group_info of one mdopt group ("matrix.0", ...): what the last step did."""
        return self.optimizer.group_info(name)

    # --- state --------------------------------------------------------------------------

    def state_dict(self):
        """Megatron's group hyperparameters (lr, weight_decay, ...) and
        MDOptimizer.state_dict(): with a checkpoint directory (state_dir= or
        $MDOPT_STATE_DIR, required on several ranks) a reference to mdopt's save there, each
        rank having written only its own rank file; on one rank without one, the checkpoint
        inline."""
        return {"format": _STATE_FORMAT, "version": 1,
                "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                 for g in self._megatron_groups],
                "mdopt": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict):
        """Restores what state_dict() (or dist_checkpointing.load of sharded_state_dict())
        returned, at any data-parallel size (mdopt reshards: each rank reads only the rows
        it now holds). Like mdopt_load, this also writes the saved weights into the model."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _STATE_FORMAT:
            raise ValueError("mdopt.megatron: not a MegatronMDOptimizer state_dict")
        if state_dict.get("version") != 1:
            raise ValueError("mdopt.megatron: state_dict version %r; this reads version 1"
                             % state_dict.get("version"))
        blob = state_dict["mdopt"]
        if isinstance(blob, ShardedObject):
            raise ValueError("mdopt.megatron: load_state_dict got an unloaded ShardedObject; "
                             "pass what dist_checkpointing.load returned")
        if isinstance(blob, (bytes, bytearray)):
            blob = torch.load(io.BytesIO(blob), weights_only=False)
        groups = state_dict["param_groups"]
        if len(groups) != len(self._megatron_groups):
            raise ValueError("mdopt.megatron: the state_dict has %d param groups, this "
                             "optimizer %d" % (len(groups), len(self._megatron_groups)))
        if _ckref.is_ref(blob):
            # From sharded_state_dict: mdopt's directory, possibly moved since (the
            # loading template's metadata["mdopt_state_dir"] says where it is now).
            self.optimizer.load_referenced(blob, self._load_dir)
        else:
            self.optimizer.load_state_dict(blob)
        for mine, saved in zip(self._megatron_groups, groups):
            for k, v in saved.items():
                if k != "params":
                    mine[k] = v

    def _stage(self):
        """(pipeline rank, pipeline size, data-parallel rank) of this rank."""
        if not parallel_state.model_parallel_is_initialized():
            return 0, 1, 0
        return (parallel_state.get_pipeline_model_parallel_rank(),
                parallel_state.get_pipeline_model_parallel_world_size(),
                parallel_state.get_data_parallel_rank(with_context_parallel=True))

    def sharded_state_dict(self, model_sharded_state_dict, is_loading=False, metadata=None):
        """For megatron.core.dist_checkpointing. mdopt writes its own sharded checkpoint:

            metadata={"mdopt_state_dir": os.path.join(checkpoint_dir, "mdopt")}

        (else the optimizer's state_dir / $MDOPT_STATE_DIR; required on several ranks, a
        directory every rank sees, e.g. under the Megatron checkpoint's directory). Saving
        runs mdopt_save there now (collective over mdopt's communicator: every rank writes
        its own rank file, rank 0 the manifest) and returns, besides the group
        hyperparameters, one ShardedObject per pipeline stage (key
        "optimizer.mdopt.state[.ppK]", shape (1,), replica_id (0, 0, data-parallel rank), so
        data-parallel rank 0 writes it) holding a few hundred bytes: the reference to that
        save (directory, step, manifest and rank file checksums), the same on every rank.
        With several pipeline stages each writes into "<dir>/ppK". Loading the result back
        with dist_checkpointing.load and passing it to load_state_dict loads mdopt's save
        at any data-parallel size; with is_loading=True, metadata["mdopt_state_dir"] says
        where the directory is now if it moved. On one rank without a directory the
        object holds the checkpoint inline instead (torch.save bytes). The model's sharded
        state dict is not needed: mdopt's checkpoint names its tensors itself."""
        pp_rank, pp_size, dp_rank = self._stage()
        d = (metadata or {}).get("mdopt_state_dir")
        if d is not None and pp_size > 1:
            d = os.path.join(os.fspath(d), "pp%d" % pp_rank)
        key = SHARDED_KEY if pp_size == 1 else "%s.pp%d" % (SHARDED_KEY, pp_rank)
        if is_loading:
            self._load_dir = d
            data = None
        else:
            d = _ckref.shared_dir(d if d is not None else self.optimizer.state_dir,
                                  self.optimizer.comm.size,
                                  "MegatronMDOptimizer.sharded_state_dict")
            if d is None:
                buf = io.BytesIO()
                torch.save(self.optimizer.state_dict(), buf)
                data = buf.getvalue()
            else:
                self.optimizer.save_checkpoint(d)
                data = _ckref.make(d, 0)  # rank 0's file named: identical on every rank
        return {"format": _STATE_FORMAT, "version": 1,
                "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                 for g in self._megatron_groups],
                "mdopt": ShardedObject(key, data, (1,), (0,), replica_id=(0, 0, dp_rank))}

    def reload_model_params(self, state_dict=None):
        """The model's weights were changed outside the optimizer (a model-only checkpoint
        was loaded): mdopt is rebuilt on them. Its state starts afresh (gains 1, no
        moments) and the matrices are projected onto their spheres, unless their group
        says preserve_init=1 (spec={"matrix": {"preserve_init": 1}})."""
        if state_dict is not None:
            raise TypeError("mdopt.megatron: reload_model_params(state_dict) is not "
                            "supported; load the weights into the model, then call it "
                            "without arguments")
        self.optimizer = self._make_mdopt()  # the old one frees its mdopt state when dropped

    def offload_to_cpu(self):
        raise NotImplementedError("mdopt.megatron: offload_to_cpu is not supported (mdopt "
                                  "holds pointers to the parameters' memory)")

    def restore_from_cpu(self):
        raise NotImplementedError("mdopt.megatron: restore_from_cpu is not supported")


def get_megatron_mdopt_optimizer(config, model_chunks, config_overrides=None, **kwargs):
    """The counterpart of megatron.core.optimizer.get_megatron_optimizer (and, for
    config.optimizer == "muon", of get_megatron_muon_optimizer): one MegatronMDOptimizer
    over every trainable tensor of the model chunks. Keyword arguments: those of
    MegatronMDOptimizer (presets, lrs, spec, comm, options, threads, ...)."""
    return MegatronMDOptimizer(config, model_chunks, config_overrides, **kwargs)


__all__ = ["MEGATRON_CORE_TESTED", "MegatronMDOptimizer", "ROLES", "SHARDED_KEY",
           "get_megatron_mdopt_optimizer", "megatron_layouts", "megatron_role"]
