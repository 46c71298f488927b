"""Parameter groups and LR schedules as the method describes them.

    groups = param_groups(model, matrix_preset="md-muon", lr=0.02)
    opt = MDOptimizer(groups, threads=2)
    sched = linear_decay(opt, total_steps)      # the paper's default: linear to 1e-8 of peak

The method (Hägele et al., "Decoupling the Magnitude and Direction of Weight Vectors"):
hidden matrices get the matrix optimizer on a Frobenius sphere with row and column gains
(md-muon, or md-adamw); embeddings and the LM head keep unit-norm rows under Adam
(`embedding` preset) at 3e-3 (embeddings) and 1e-3 (output layer), an untied head with row
and column gains (gains=rowcol; a tied head is the embedding's parameter and takes its group); every other
Adam-optimized parameter (norm gains, biases: `vector`) and the gains at 1e-3; MoE routers
are normalized along the expert axis (rows) with Muon at the matrix lr (`router`); MoE
expert stacks (E x d_out x d_in tensors) are E independent matrices of the matrix group.
No weight decay anywhere, no warmup needed, and one schedule for every group.
"""

import math
import re

import torch

_ROUTER = re.compile(r"(^|[._])(router|gate)(\.weight)?$|router")
_HEAD = re.compile(r"(^|\.)(lm_head|output|head|unembed|classifier)(\.weight)?$")


def _default_kind(name, param, module, embeddings, head_names):
    """embedding | head | router | matrix | vector for one named parameter."""
    if isinstance(module, torch.nn.Embedding) or name in embeddings:
        return "embedding"
    if name in head_names:
        return "head"
    if param.dim() <= 1:
        return "vector"
    if _ROUTER.search(name.rsplit(".", 1)[0] if name.endswith(".weight") else name) and \
            param.dim() == 2:
        return "router"
    return "matrix"


def param_groups(model, matrix_preset="md-muon", lr=None, *, embedding_lr=3e-3, head_lr=1e-3,
                 vector_lr=1e-3, gain_lr=1e-3, router_lr=None, head_names=None,
                 classify=None, blocks=None, head_gains="rowcol", **matrix_overrides):
    """Param groups for MDOptimizer from a model, by what each tensor is:

    - `matrices`: 2-D hidden matrices and 3-D expert stacks (each expert its own matrix, with
      its own sphere, gains and Newton-Schulz), `matrix_preset` (md-muon or md-adamw, or a
      baseline) at `lr` (the preset's when None) and `gain_lr`, plus `matrix_overrides`
      (spec keys, e.g. ns_coeffs="polar_express"); tensors of more than 3 dimensions (conv
      kernels) as 2-D (d0, rest);
    - `embeddings`: nn.Embedding weights, `embedding` preset (unit rows) at `embedding_lr`;
    - `head`: the output layer (a 2-D parameter named like lm_head/output/head/classifier
      .weight -- with as many rows as an embedding has entries, when the model has one --,
      or those listed in `head_names`; a head tied to the embedding is the embedding's
      Parameter and stays there), `embedding` preset with row and column gains at `head_lr`
      (gains at `gain_lr`; `head_gains="none"` for a head without gains, or another spec
      value of `gains`);
    - `routers`: 2-D weights named like *router* or *.gate, `router` preset at `router_lr`
      (default: the matrix lr);
    - `vectors`: 1-D tensors (norm gains, biases), `vector` preset at `vector_lr`.

    `blocks` {name: K or blocks= value} (or a callable (name, param) -> the same or None):
    matrices made of logical matrices stacked by rows, each its own matrix to the optimizer
    (own sphere and Newton-Schulz; row gains per row, the column and scalar gains shared by
    the blocks; docs/ARCHITECTURE.md, "Logical blocks"). K (or "rows:K"): K blocks of equal
    height, a GLU linear's [gate; up] is 2. "groups:G:h0,h1,...": G groups of pieces of h0,
    h1, ... rows, block j piece j of every group: a fused QKV of 4 query groups with 4 query
    heads of 64 rows per group is "groups:4:256,64,64" (Q, K and V each across the groups;
    G = 1 gives contiguous blocks of unequal height). Each distinct value forms a group with
    the matrices' settings, "matrices-rowsK" or "matrices-groupsG-h0_h1_...".

    `classify(name, param, module)` may return one of "matrix", "embedding", "head",
    "router", "vector" (or None for the default) to override the choice. Parameters that do
    not require grad are left out. Each group carries `name` and `names` (the parameters'
    names), so mdopt's messages, checkpoints and telemetry name them. Empty groups are
    dropped."""
    head_names = set(head_names or ())
    owner = {}
    embeddings = set()
    vocab_sizes = set()
    for mname, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding):
            vocab_sizes.add(module.num_embeddings)
        for pname, p in module.named_parameters(recurse=False):
            full = "%s.%s" % (mname, pname) if mname else pname
            owner.setdefault(id(p), module)
            if isinstance(module, torch.nn.Embedding):
                embeddings.add(full)
    if not head_names:
        # By name; in a model with embeddings only a layer with a vocabulary's worth of
        # rows (so that, e.g., an attention block's "output" projection stays a matrix).
        for name, p in model.named_parameters():
            if _HEAD.search(name) and p.dim() == 2 and \
                    (not vocab_sizes or p.shape[0] in vocab_sizes):
                head_names.add(name)
    buckets = {k: [] for k in ("matrix", "router", "embedding", "head", "vector")}
    for name, p in model.named_parameters():  # each Parameter once: tied weights are one
        if not p.requires_grad:
            continue
        module = owner.get(id(p))
        kind = classify(name, p, module) if classify is not None else None
        if kind is None:
            kind = _default_kind(name, p, module, embeddings, head_names)
        if kind not in buckets:
            raise ValueError("param_groups: classify returned %r for '%s' (matrix, embedding, "
                             "head, router or vector)" % (kind, name))
        buckets[kind].append((name, p))

    # Matrices with logical row blocks: a bucket per distinct blocks= value.
    block_kinds = []  # (bucket, blocks= value)
    if blocks is not None:
        rest = []
        for name, p in buckets["matrix"]:
            k = blocks(name, p) if callable(blocks) else blocks.get(name)
            value = _blocks_value(k, name, p)
            if value is None:
                rest.append((name, p))
                continue
            kind = "matrix-" + _blocks_tag(value)
            if kind not in buckets:
                buckets[kind] = []
                block_kinds.append((kind, value))
            buckets[kind].append((name, p))
        buckets["matrix"] = rest
        if not callable(blocks):
            named = {n for n, _ in model.named_parameters()}
            unknown = sorted(set(blocks) - named)
            if unknown:
                raise ValueError("param_groups: blocks names parameters the model lacks: %s"
                                 % ", ".join(unknown))

    def group(name, kind, **spec):
        items = buckets[kind]
        g = {"name": name, "params": [p for _, p in items], "names": [n for n, _ in items]}
        g.update({k: v for k, v in spec.items() if v is not None})
        return g

    has_gains = matrix_preset in ("md-muon", "md-adamw", "router")
    matrix = dict(matrix_overrides)
    if has_gains:
        matrix.setdefault("gain_lr", gain_lr)
    out = [
        group("matrices", "matrix", preset=matrix_preset, lr=lr, **matrix),
    ] + [
        group("matrices" + kind[len("matrix"):], kind, preset=matrix_preset, lr=lr,
              blocks=value, **matrix)
        for kind, value in block_kinds
    ] + [
        group("routers", "router", preset="router", lr=router_lr if router_lr is not None else lr,
              gain_lr=gain_lr),
        group("embeddings", "embedding", preset="embedding", lr=embedding_lr),
        group("head", "head", preset="embedding", gains=head_gains, lr=head_lr,
              gain_lr=gain_lr if head_gains != "none" else None),
        group("vectors", "vector", preset="vector", lr=vector_lr),
    ]
    return [g for g in out if g["params"]]


def _blocks_value(k, name, p):
    """The blocks= value of param_groups' `blocks` entry for one matrix (None: one block):
    K (an int) or "rows:K", K equal row blocks; or "groups:G:h0,h1,...", G groups of pieces
    of h0, h1, ... rows, block j piece j of every group."""
    bad = "param_groups: blocks=%r for '%s' of shape %s: " % (k, name, tuple(p.shape))
    if k is None or k == "none":
        return None
    if isinstance(k, str) and k.startswith("rows:"):
        try:
            k = int(k[len("rows:"):])
        except ValueError:
            raise ValueError(bad + "rows:K takes an integer K") from None
    if isinstance(k, str):
        parts = k.split(":")
        try:
            if len(parts) != 3 or parts[0] != "groups":
                raise ValueError
            g, heights = int(parts[1]), [int(h) for h in parts[2].split(",")]
        except ValueError:
            raise ValueError(bad + "a number of row blocks K, \"rows:K\" or "
                             "\"groups:G:h0,h1,...\"") from None
        if g < 1 or min(heights) < 1 or p.dim() < 2 or p.shape[-2] != g * sum(heights):
            raise ValueError(bad + "its %s rows are not %d groups of %s rows"
                             % (p.shape[-2] if p.dim() >= 2 else "no", g,
                                " + ".join(map(str, heights))))
        return "groups:%d:%s" % (g, ",".join(map(str, heights)))
    if int(k) == 1:
        return None
    if int(k) != k or k < 1 or p.dim() < 2 or p.shape[-2] % int(k) != 0:
        raise ValueError(bad + "rows must be a multiple of it")
    return "rows:%d" % int(k)


def _blocks_tag(value):
    """A group name's part for a blocks= value: rows:2 -> rows2, groups:4:256,64,64 ->
    groups4-256_64_64."""
    if value.startswith("rows:"):
        return "rows" + value[len("rows:"):]
    g, heights = value[len("groups:"):].split(":")
    return "groups%s-%s" % (g, heights.replace(",", "_"))


def linear_decay(optimizer, total_steps, warmup_steps=0, final_ratio=1e-8):
    """LambdaLR: the paper's default, every group's lr linearly from its peak to
    `final_ratio` of it at `total_steps` (optional linear warmup: (t+1)/warmup_steps for
    t < warmup_steps; the method needs none). One scheduler.step() per optimizer step."""
    _check_steps(total_steps, warmup_steps)

    def factor(t):
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        progress = min(1.0, (t - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - (1.0 - final_ratio) * progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def wsd(optimizer, total_steps, warmup_steps=0, cooldown_frac=0.2, final_ratio=1e-8,
        shape="1-sqrt"):
    """LambdaLR: warmup-stable-decay. Linear warmup over `warmup_steps`, constant peak, then
    over the last `cooldown_frac` of `total_steps` a cooldown to `final_ratio` of the peak,
    shaped `1-sqrt` (factor 1 - sqrt(progress), the established WSD recipe the method
    compares against) or `linear`."""
    _check_steps(total_steps, warmup_steps)
    if not 0.0 <= cooldown_frac <= 1.0:
        raise ValueError("wsd: cooldown_frac must be in [0, 1], not %r" % (cooldown_frac,))
    if shape not in ("1-sqrt", "linear"):
        raise ValueError("wsd: shape must be '1-sqrt' or 'linear', not %r" % (shape,))
    cooldown = int(round(cooldown_frac * total_steps))
    start = total_steps - cooldown

    def factor(t):
        if t < warmup_steps:
            return (t + 1) / warmup_steps
        if t < start or cooldown == 0:
            return 1.0
        progress = min(1.0, (t - start) / cooldown)
        drop = math.sqrt(progress) if shape == "1-sqrt" else progress
        return final_ratio + (1.0 - final_ratio) * (1.0 - drop)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _check_steps(total_steps, warmup_steps):
    if int(total_steps) != total_steps or total_steps < 1:
        raise ValueError("total_steps must be a positive integer, not %r" % (total_steps,))
    if int(warmup_steps) != warmup_steps or not 0 <= warmup_steps < total_steps:
        raise ValueError("warmup_steps must be an integer in [0, total_steps), not %r"
                         % (warmup_steps,))
