#!/usr/bin/env python3
"""Train a small byte-level GPT on Debian's fortunes with mdopt or torch's optimizers.

Runs one or more optimizers (comma-separated --optimizer) on the same model initialisation,
the same batches and the same validation bytes, then writes

  <out>/train_gpt.csv   one row per step and run: train loss, validation loss (at evaluation
                        steps), gradient norm, step time and every matrix's relative update
                        ||W_new - W_old|| / ||W_old|| (Frobenius)
  <out>/train_gpt.png   validation and train loss, relative update and gradient norm per step

Losses are cross-entropy in nats per byte (divide by ln 2 for bits per byte; a uniform guess
over 256 bytes is ln 256 = 5.55). The learning-rate schedule multiplies every group's LR
(linear decay to 1e-8 by default, as in the recipe; no warmup).

Defaults are the tiny CPU configuration of the README's demo (0.46 M parameters, 300
steps of 16 x 64 bytes; 25-35 s per optimizer on 2 cores). Example:
  python3 integration/examples/train_gpt.py --optimizer md-muon,torch-adamw,torch-muon
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fortunes_data  # noqa: E402
import optimizers  # noqa: E402
from tiny_gpt import GPTConfig, TinyGPT  # noqa: E402


def lr_schedule(kind: str, step: int, steps: int, warmup: int) -> float:
    """Multiplier of the peak LRs at step (0-based) of steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "linear":  # to 1e-8 of the peak at the last step
        frac = (step - warmup) / max(1, steps - 1 - warmup)
        return 1.0 - (1.0 - 1e-8) * frac
    if kind == "wsd":  # stable, then a 1-sqrt cooldown over the last 20% of the steps
        cooldown = max(1, round(0.2 * steps))
        into = step - (steps - cooldown)
        return 1.0 if into < 0 else max(1e-8, 1.0 - math.sqrt((into + 1) / cooldown))
    raise ValueError(kind)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizer", default="md-muon",
                   help="comma-separated list of: " + ", ".join(optimizers.NAMES))
    p.add_argument("--lr", type=float, default=None,
                   help="peak LR of the hidden matrices (default: each optimizer's own, "
                        "see optimizers.py); embeddings, LM head and gains keep theirs")
    p.add_argument("--head-gains", choices=("rowcol", "none"), default=optimizers.HEAD_GAINS,
                   help="the untied LM head's gains under mdopt's optimizers (unit-norm rows "
                        "with row and column gains: the method's default); torch's "
                        "optimizers leave the head free")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=64, help="bytes per sequence")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--schedule", choices=("linear", "wsd", "constant"), default="linear")
    p.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    p.add_argument("--eval-every", type=int, default=50, help="validation loss every N steps (and at the end)")
    p.add_argument("--val-tokens", type=int, default=16384, help="validation bytes predicted per evaluation")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads, and mdopt's threads=")
    p.add_argument("--seed", type=int, default=0, help="model initialisation and batch order")
    p.add_argument("--device", default="cpu",
                   help="torch device of the model; mdopt's optimizers need cpu in this version")
    p.add_argument("--data-dir", default=fortunes_data.DEFAULT_DIR)
    p.add_argument("--out-dir", default="train_gpt_out")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (prints a line at every evaluation instead)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.optimizer.split(",") if n.strip()]
    bad = [n for n in names if n not in optimizers.NAMES]
    if not names or bad:
        p.error(f"--optimizer: unknown {bad or 'empty'}; choose from {', '.join(optimizers.NAMES)}")
    args.optimizers = names
    return args


@torch.no_grad()
def evaluate(model: TinyGPT, val: tuple[torch.Tensor, torch.Tensor], device, batch: int = 32) -> float:
    model.eval()
    x, y = val
    total = 0.0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i:i + batch].to(device), y[i:i + batch].to(device)
        total += model(xb, yb).item() * xb.shape[0]
    model.train()
    return total / x.shape[0]


def train_one(args, name: str, corpus, lr: float | None = None, progress: bool = True,
              log_evals: bool = False) -> dict:
    """One run; returns {'rows': [...], 'final_val': float, 'diverged': bool, 'seconds': float}."""
    device = torch.device(args.device)
    if device.type != "cpu" and name in optimizers.MDOPT:
        raise SystemExit(f"--optimizer {name} needs --device cpu: this mdopt version has no "
                         "CUDA backend (torch-adamw and torch-muon run on any device)")
    torch.manual_seed(args.seed)
    cfg = GPTConfig(d_model=args.d_model, layers=args.layers, heads=args.heads, seq_len=args.seq_len)
    model = TinyGPT(cfg).to(device)
    opt = optimizers.build(name, model, lr, args.threads, args.head_gains)
    matrix_lr = optimizers.DEFAULT_MATRIX_LR[name] if lr is None else lr
    batches = fortunes_data.Batches(corpus.train, args.batch_size, args.seq_len, args.seed + 1)
    val = fortunes_data.val_windows(corpus.val, args.seq_len, args.val_tokens)
    matrices = model.matrices()
    hidden = [n for n, _ in matrices if not n.startswith(("embed.", "lm_head."))]

    bar = None
    if progress and sys.stderr.isatty():  # a bar in a log file would be one line per update
        try:
            from tqdm import tqdm
            bar = tqdm(total=args.steps, desc=f"{name} lr={matrix_lr:g}", unit="step",
                       dynamic_ncols=True, leave=True)
        except ImportError:
            bar = None
    rows, diverged, t_start = [], False, time.perf_counter()
    val_loss = evaluate(model, val, device)
    for step in range(args.steps):
        t0 = time.perf_counter()
        scale = lr_schedule(args.schedule, step, args.steps, args.warmup)
        x, y = batches.next()
        loss = model(x.to(device), y.to(device))
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        before = [p.detach().clone() for _, p in matrices]
        opt.step(scale)
        opt.zero_grad()
        with torch.no_grad():
            rel = {n: (torch.linalg.vector_norm(p - w0) / torch.linalg.vector_norm(w0)).item()
                   for (n, p), w0 in zip(matrices, before)}
        seconds = time.perf_counter() - t0
        train_loss = loss.item()
        if not math.isfinite(train_loss) or train_loss > 20:
            diverged = True
        last = step == args.steps - 1
        evaluated = not diverged and ((step + 1) % args.eval_every == 0 or last)
        if evaluated:
            val_loss = evaluate(model, val, device)
        row = {
            "optimizer": name, "matrix_lr": matrix_lr, "step": step + 1, "lr_scale": scale,
            "train_loss": train_loss, "val_loss": val_loss if evaluated else "",
            "grad_norm": grad_norm, "step_seconds": seconds,
            "rel_update_hidden_mean": sum(rel[n] for n in hidden) / len(hidden),
        }
        row.update({f"rel_update:{n}": v for n, v in rel.items()})
        rows.append(row)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train=f"{train_loss:.3f}", val=f"{val_loss:.3f}")
        elif log_evals and evaluated:
            print(f"  {name} step {step + 1}/{args.steps}: train {train_loss:.4f}, "
                  f"validation {val_loss:.4f} nats/byte, {time.perf_counter() - t_start:.1f} s")
        if diverged:
            break
    if bar is not None:
        bar.close()
    final_val = val_loss if not diverged else float("nan")
    return {"rows": rows, "final_val": final_val, "diverged": diverged,
            "seconds": time.perf_counter() - t_start, "matrix_lr": matrix_lr,
            "params": sum(p.numel() for p in model.parameters())}


def write_csv(path: str, rows: list[dict]) -> None:
    fields = list(rows[0].keys())
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _ema(xs: list[float], a: float = 0.9) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else a * m + (1 - a) * x
        out.append(m)
    return out


def plot(path: str, runs: dict[str, list[dict]], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, (label, rows) in enumerate(runs.items()):
        c = f"C{i}"
        steps = [r["step"] for r in rows]
        ax[0].plot(steps, _ema([r["train_loss"] for r in rows]), color=c, alpha=0.45, lw=1)
        ev = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] != ""]
        ax[0].plot([s for s, _ in ev], [v for _, v in ev], "o-", color=c, ms=3, label=label)
        ax[1].plot(steps, [r["rel_update_hidden_mean"] for r in rows], color=c, label=label)
        ax[2].plot(steps, [r["grad_norm"] for r in rows], color=c, lw=0.8, label=label)
    ax[0].set(xlabel="step", ylabel="loss (nats/byte)",
              title="validation (markers) and train loss (EMA 0.9, faint)")
    finals = [float(r["val_loss"]) for rows in runs.values() for r in rows if r["val_loss"] != ""]
    if finals:
        lo = min(finals)
        ax[0].set_ylim(lo - 0.1, min(5.7, lo + 1.6))
    ax[1].set(xlabel="step", ylabel="||ΔW|| / ||W||", yscale="log",
              title="relative update, mean over hidden matrices")
    # The last steps run at LRs down to 1e-8 of the peak; show the first 95% of the decay.
    body = [r["rel_update_hidden_mean"] for rows in runs.values()
            for r in rows[: max(1, int(0.95 * len(rows)))] if r["rel_update_hidden_mean"] > 0]
    if body:
        ax[1].set_ylim(min(body) / 2, max(body) * 2)
    ax[2].set(xlabel="step", ylabel="||g||", yscale="log", title="gradient norm (all parameters)")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = fortunes_data.load(args.data_dir)
    os.makedirs(args.out_dir, exist_ok=True)
    print(f"data: {corpus.quotations} quotations from {corpus.files} files; "
          f"train {corpus.train.numel() / 1e6:.2f} MB, validation {corpus.val.numel() / 1e6:.2f} MB")
    tokens = args.batch_size * args.seq_len
    runs, results = {}, {}
    for name in args.optimizers:
        res = train_one(args, name, corpus, args.lr, progress=not args.no_progress,
                        log_evals=args.no_progress or not sys.stderr.isatty())
        if name == args.optimizers[0]:
            print(f"model: {res['params'] / 1e6:.2f} M parameters (d={args.d_model}, L={args.layers}, "
                  f"{args.heads} heads); {args.steps} steps of {tokens} bytes")
        label = f"{name} (lr {res['matrix_lr']:g})"
        runs[label], results[label] = res["rows"], res
    all_rows = [r for rows in runs.values() for r in rows]
    csv_path = os.path.join(args.out_dir, "train_gpt.csv")
    write_csv(csv_path, all_rows)
    print(f"\nvalidation loss after {args.steps} steps, nats/byte (bits/byte); lower is better:")
    if any(n in optimizers.MDOPT for n in args.optimizers):
        head = ("unit-norm rows with row and column gains" if args.head_gains == "rowcol"
                else "unit-norm rows, no gains")
        free = "; free under torch's AdamW" if any(n in optimizers.TORCH for n in args.optimizers) else ""
        print(f"  (LM head: {head} under mdopt{free})")
    for label, res in results.items():
        v = res["final_val"]
        state = "DIVERGED" if res["diverged"] else f"{v:.4f} ({v / math.log(2):.3f})"
        print(f"  {label:28s} {state:>20s}   {res['seconds']:6.1f} s")
    print(f"wrote {csv_path}")
    if not args.no_plot:
        png = os.path.join(args.out_dir, "train_gpt.png")
        plot(png, runs, f"TinyGPT d={args.d_model} L={args.layers} on Debian fortunes, "
                        f"{args.steps} steps x {tokens} bytes, {args.schedule} schedule, seed {args.seed}")
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
