"""Byte-level English text from Debian's `fortunes` package, with a held-out split.

The corpus ships with the distribution (apt-get install fortunes), so the examples train on
real text without downloading anything at run time. Each file under the fortunes directory
is a list of quotations separated by lines holding a single '%'; the files' `.dat` indexes
and `.u8` links are skipped. Some quotations use teletype overstriking ("_\\bx" for an
underlined x); the backspace pairs are removed so the model sees plain text.

Every `val_every`-th quotation (in a fixed file and position order) goes to the validation
split, so both splits sample every file and no quotation is in both.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch

DEFAULT_DIR = "/usr/share/games/fortunes"
VOCAB_SIZE = 256  # bytes

_SEPARATOR = re.compile(rb"^%\s*$", re.MULTILINE)
_OVERSTRIKE = re.compile(rb"[^\x08]\x08")


def _quotations(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        raw = f.read()
    raw = _OVERSTRIKE.sub(b"", raw)
    return [q.strip(b"\n") for q in _SEPARATOR.split(raw) if q.strip()]


@dataclass
class Corpus:
    train: torch.Tensor  # uint8, 1-D
    val: torch.Tensor
    files: int
    quotations: int


def load(directory: str = DEFAULT_DIR, val_every: int = 20) -> Corpus:
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"{directory} not found: install Debian's fortunes "
            "(apt-get install fortunes fortune-mod, or launch/install-deps.sh)")
    train, val, files, count = [], [], 0, 0
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(".dat") or os.path.islink(path) or not os.path.isfile(path):
            continue
        files += 1
        for q in _quotations(path):
            (val if count % val_every == 0 else train).append(q)
            count += 1
    if count < 100:
        raise ValueError(f"{directory} holds only {count} quotations")

    def pack(qs: list[bytes]) -> torch.Tensor:
        blob = b"\n\n".join(qs) + b"\n\n"
        return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()

    return Corpus(train=pack(train), val=pack(val), files=files, quotations=count)


class Batches:
    """Random windows of seq_len + 1 bytes from the training split, from a seeded generator
    of their own, so every optimizer compared sees the same batches in the same order."""

    def __init__(self, data: torch.Tensor, batch_size: int, seq_len: int, seed: int):
        if data.numel() <= seq_len + 1:
            raise ValueError("training split shorter than one sequence")
        self.data, self.batch_size, self.seq_len = data, batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (self.batch_size,),
                               generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)[None, :]
        w = self.data[idx].long()
        return w[:, :-1], w[:, 1:]


def val_windows(data: torch.Tensor, seq_len: int, max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows from the start of the validation split, at most max_tokens
    predicted bytes: the same fixed set for every evaluation and every run."""
    n = min((data.numel() - 1) // seq_len, max(1, max_tokens // seq_len))
    x = data[: n * seq_len].view(n, seq_len).long()
    y = data[1 : n * seq_len + 1].view(n, seq_len).long()
    return x, y
