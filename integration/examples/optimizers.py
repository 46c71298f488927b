"""The optimizers the examples compare, behind one small interface.

`build(name, model, matrix_lr, threads, head_gains)` returns an object with `zero_grad()`
and `step(lr_scale)`, where lr_scale multiplies every group's learning rate (the schedule).

Names:
  md-muon, md-adamw, muon, adamw, muonh, adamh
      mdopt's presets for the hidden matrices (docs/ABI.md); embeddings, the LM head and the
      1-D gains get mdopt's embedding and vector presets at the recipe's fixed Adam LRs
      (3e-3 embeddings, 1e-3 LM head and gains). The untied LM head keeps unit-norm rows
      with row and column gains (Adam at 1e-3), as in the method's code (mdopt.recipes;
      head_gains="none" gives it none).
  torch-adamw
      torch.optim.AdamW on everything: matrices at matrix_lr with weight decay 0.1,
      embeddings 3e-3, LM head and gains 1e-3 without weight decay.
  torch-muon
      torch.optim.Muon on the 2-D hidden matrices (weight decay 0.1, update scaled by
      max(1, sqrt(d_out/d_in)) as in Keller Jordan's original and mdopt's muon preset), and
      torch.optim.AdamW on the rest as above: the standard way to run Muon.

The matrix LR defaults are mdopt's preset defaults; the torch ones match mdopt's adamw and
muon presets. Betas 0.9/0.95 and eps 1e-8 everywhere, as in mdopt's presets.
"""

from __future__ import annotations

import os
import sys

import torch

MDOPT = ("md-muon", "md-adamw", "muon", "adamw", "muonh", "adamh")
TORCH = ("torch-adamw", "torch-muon")
NAMES = MDOPT + TORCH

DEFAULT_MATRIX_LR = {
    "md-muon": 8e-3, "md-adamw": 1e-3, "muon": 2e-2, "adamw": 1e-3, "muonh": 8e-3,
    "adamh": 1e-3, "torch-adamw": 1e-3, "torch-muon": 2e-2,
}
EMBED_LR = 3e-3
HEAD_LR = 1e-3
HEAD_GAINS = "rowcol"  # the untied LM head's gains under mdopt (the method's default)
VECTOR_LR = 1e-3
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)


def split_params(model: torch.nn.Module):
    """(hidden matrices, embedding, LM head, 1-D gains) by name."""
    hidden, embed, head, vectors = [], [], [], []
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            embed.append(p)
        elif name.startswith("lm_head."):
            head.append(p)
        elif p.ndim == 2:
            hidden.append(p)
        else:
            vectors.append(p)
    return hidden, embed, head, vectors


class _TorchOptimizers:
    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.base = [[g["lr"] for g in o.param_groups] for o in optimizers]

    def zero_grad(self) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=True)

    def step(self, lr_scale: float) -> None:
        for o, base in zip(self.optimizers, self.base):
            for g, lr in zip(o.param_groups, base):
                g["lr"] = lr * lr_scale
            o.step()


def _adamw_rest(embed, head, vectors, extra=()):
    groups = list(extra) + [
        {"params": embed, "lr": EMBED_LR, "weight_decay": 0.0},
        {"params": head, "lr": HEAD_LR, "weight_decay": 0.0},
        {"params": vectors, "lr": VECTOR_LR, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, betas=BETAS, eps=1e-8)


def build(name: str, model: torch.nn.Module, matrix_lr: float | None, threads: int,
          head_gains: str = HEAD_GAINS):
    if name not in NAMES:
        raise ValueError(f"unknown optimizer {name!r}; one of {', '.join(NAMES)}")
    lr = DEFAULT_MATRIX_LR[name] if matrix_lr is None else matrix_lr
    hidden, embed, head, vectors = split_params(model)
    if name == "torch-adamw":
        return _TorchOptimizers([_adamw_rest(
            embed, head, vectors, [{"params": hidden, "lr": lr, "weight_decay": WEIGHT_DECAY}])])
    if name == "torch-muon":
        muon = torch.optim.Muon(hidden, lr=lr, weight_decay=WEIGHT_DECAY, momentum=0.95,
                                nesterov=True, adjust_lr_fn="original")
        return _TorchOptimizers([muon, _adamw_rest(embed, head, vectors)])
    return _build_mdopt(name, model, lr, threads, head_gains)


def _build_mdopt(preset: str, model: torch.nn.Module, lr: float, threads: int,
                 head_gains: str):
    # The package lives in this repository (integration/python); libmdopt.so is found by
    # $MDOPT_LIBRARY, $MDOPT_BUILD_DIR or the checkout's build/ (see mdopt/_lib.py).
    here = os.path.dirname(os.path.abspath(__file__))
    pkg = os.path.normpath(os.path.join(here, "..", "python"))
    if os.path.isdir(pkg) and pkg not in sys.path:
        sys.path.insert(0, pkg)
    try:
        from mdopt.recipes import param_groups
        from mdopt.torch import MDOptimizer
    except ImportError as e:
        raise SystemExit(f"--optimizer {preset} needs mdopt's Python package "
                         f"(integration/python): {e}") from e
    groups = param_groups(model, matrix_preset=preset, lr=lr, embedding_lr=EMBED_LR,
                          head_lr=HEAD_LR, vector_lr=VECTOR_LR, gain_lr=VECTOR_LR,
                          head_gains=head_gains)
    head = [g for g in groups if g["name"] == "head"]
    if head_gains != "none" and (len(head) != 1 or head[0]["names"] != ["lm_head.weight"]):
        raise SystemExit(f"--optimizer {preset}: expected the untied lm_head.weight as the "
                         f"head group, got {[g['names'] for g in head]}")
    # A torch.optim.Optimizer: its groups' "lr" is read at every step, as for torch's own.
    return _TorchOptimizers([MDOptimizer(groups, threads=threads,
                                         named_parameters=model.named_parameters())])
