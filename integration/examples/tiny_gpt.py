"""A small GPT in the shape the MD-decoupling recipe trains (scaled down).

Pre-norm transformer blocks with the recipe's extras: QK-norm, a sandwich norm (an RMSNorm
on each sub-block's output) followed by a fixed scale alpha = 1/L, rotary positions, an
untied LM head, and no biases. Hidden matrices start at standard deviation 1/sqrt(d), which
puts each one at Frobenius norm sqrt(max(d_out, d_in)), the sphere mdopt holds it on, so the
projection at finalize does not change the model. Embedding and LM-head rows start near unit
norm (also std 1/sqrt(d)); the embedding is scaled up by sqrt(d) so the residual stream
starts at RMS 1.

Parameter names say what each tensor is, for the optimizer groups:
  embed.weight                    vocab x d   token embedding
  lm_head.weight                  vocab x d   output layer (untied)
  blocks.<i>.attn.{q,k,v,o}.weight            hidden matrices
  blocks.<i>.mlp.{fc1,fc2}.weight             hidden matrices
  *norm*.weight                   1-D         RMSNorm gains
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab: int = 256
    d_model: int = 128
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    mlp_ratio: int = 4


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, eps=1e-6)


def _rotary(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    ang = torch.arange(seq_len, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        d = cfg.d_model
        self.heads, self.head_dim = cfg.heads, d // cfg.heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        shape = (b, t, self.heads, self.head_dim)
        q = _apply_rotary(self.q_norm(self.q(x).view(shape)), cos, sin).transpose(1, 2)
        k = _apply_rotary(self.k_norm(self.k(x).view(shape)), cos, sin).transpose(1, 2)
        v = self.v(x).view(shape).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.fc2 = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm, self.attn, self.attn_out_norm = RMSNorm(cfg.d_model), Attention(cfg), RMSNorm(cfg.d_model)
        self.mlp_norm, self.mlp, self.mlp_out_norm = RMSNorm(cfg.d_model), MLP(cfg), RMSNorm(cfg.d_model)
        # Depth scaling: the block outputs are normalised, then scaled by 1/L.
        self.alpha = 1.0 / cfg.layers

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.alpha * self.attn_out_norm(self.attn(self.attn_norm(x), cos, sin))
        return x + self.alpha * self.mlp_out_norm(self.mlp(self.mlp_norm(x)))


class TinyGPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.d_model % cfg.heads or (cfg.d_model // cfg.heads) % 2:
            raise ValueError("d_model must split into heads of even size")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.final_norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        cos, sin = _rotary(cfg.seq_len, cfg.d_model // cfg.heads)
        self.register_buffer("rot_cos", cos, persistent=False)
        self.register_buffer("rot_sin", sin, persistent=False)
        std = 1.0 / math.sqrt(cfg.d_model)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                nn.init.normal_(p, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.embed(idx) * math.sqrt(self.cfg.d_model)
        # (t, 1, head_dim/2): broadcast over the heads of (b, t, heads, head_dim/2).
        cos, sin = self.rot_cos[:t, None, :], self.rot_sin[:t, None, :]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.lm_head(self.final_norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.reshape(-1))

    def matrices(self) -> list[tuple[str, nn.Parameter]]:
        """Every 2-D parameter, in registration order (for relative-update logging)."""
        return [(n, p) for n, p in self.named_parameters() if p.ndim == 2]
