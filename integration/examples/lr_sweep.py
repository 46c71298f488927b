#!/usr/bin/env python3
"""Final validation loss against the matrix learning rate, per optimizer (a small Figure 1).

For each optimizer, trains the same TinyGPT (same initialisation, batches and validation
bytes as train_gpt.py) at a grid of matrix LRs spaced by factors of 2 around that optimizer's
default, keeping every other group's LR fixed (embeddings 3e-3, LM head and gains 1e-3), as
the method's sweeps do. Writes

  <out>/lr_sweep.csv   optimizer, matrix_lr, final validation loss, train loss (mean of the
                       last 10% of steps), diverged, seconds
  <out>/lr_sweep.png   final validation loss against matrix LR, one line per optimizer
  <out>/lr_sweep.md    the same as a markdown table, best LR per optimizer in bold

Model and schedule flags are train_gpt.py's (see --help). Runs already in the CSV are kept
when --resume is given, so an interrupted sweep continues where it stopped.

Example (the committed figure; about 20 minutes on 2 cores):
  python3 integration/examples/lr_sweep.py --optimizers adamw,muon,muonh,md-muon
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fortunes_data  # noqa: E402
import optimizers  # noqa: E402
import train_gpt  # noqa: E402

FIELDS = ("optimizer", "matrix_lr", "lr_multiplier", "final_val_loss", "final_train_loss",
          "diverged", "seconds")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Every other flag (--steps, --d-model, --layers, --batch-size, --seq-len, "
               "--schedule, --threads, --seed, ...) goes to train_gpt.py: see its --help.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--optimizers", default="adamw,muon,muonh,md-muon",
                   help="comma-separated, from: " + ", ".join(optimizers.NAMES))
    p.add_argument("--multipliers", default="0.25,0.5,1,2,4,8",
                   help="matrix LRs = each optimizer's default times these")
    p.add_argument("--out-dir", default="lr_sweep_out")
    p.add_argument("--resume", action="store_true", help="keep the runs already in the CSV")
    p.add_argument("--merge", default="",
                   help="comma-separated CSVs of other sweeps (same model flags) to add; "
                        "with --report-only, to combine sweeps run in parallel")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the table and plot from the CSV (and --merge)")
    own, rest = p.parse_known_args(argv)
    rest = rest + ["--no-plot", "--no-progress"]
    targs = train_gpt.parse_args(["--optimizer", "adamw"] + rest)
    own.optimizers = [n.strip() for n in own.optimizers.split(",") if n.strip()]
    bad = [n for n in own.optimizers if n not in optimizers.NAMES]
    if bad:
        p.error(f"--optimizers: unknown {bad}")
    own.multipliers = [float(m) for m in own.multipliers.split(",")]
    return own, targs


def _key(name: str, lr: float) -> tuple[str, str]:
    return name, f"{lr:.6g}"


def read_csv(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot(path: str, rows: list[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    names = list(dict.fromkeys(r["optimizer"] for r in rows))
    finite = [float(r["final_val_loss"]) for r in rows if r["diverged"] == "0"]
    top = (min(finite) + 0.6) if finite else 6.0
    for i, name in enumerate(names):
        rs = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: float(r["matrix_lr"]))
        lrs = [float(r["matrix_lr"]) for r in rs]
        vals = [float(r["final_val_loss"]) if r["diverged"] == "0" else math.nan for r in rs]
        ax.plot(lrs, [min(v, top) for v in vals], "o-", color=f"C{i}", label=name)
        ok = [(v, lr) for v, lr in zip(vals, lrs) if math.isfinite(v)]
        if ok:
            v, lr = min(ok)
            ax.plot([lr], [v], "*", color=f"C{i}", ms=14)
        for lr, v in zip(lrs, vals):
            if not math.isfinite(v) or v > top:
                ax.plot([lr], [top], "x", color=f"C{i}", ms=8)
    ax.set(xscale="log", xlabel="matrix learning rate (peak)", ylabel="final validation loss (nats/byte)",
           title=title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(title="star: best; x: diverged or off the top")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    out = ["| optimizer | matrix LR | x default | final val loss (nats/byte) | final train loss |",
           "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["optimizer"] for r in rows):
        rs = sorted((r for r in rows if r["optimizer"] == name), key=lambda r: float(r["matrix_lr"]))
        ok = [float(r["final_val_loss"]) for r in rs if r["diverged"] == "0"]
        best = min(ok) if ok else None
        for r in rs:
            if r["diverged"] == "1":
                val, tr = "diverged", "-"
            else:
                v = float(r["final_val_loss"])
                val = f"**{v:.4f}**" if v == best else f"{v:.4f}"
                tr = f"{float(r['final_train_loss']):.4f}"
            out.append(f"| {name} | {float(r['matrix_lr']):.4g} | {float(r['lr_multiplier']):g} | {val} | {tr} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up when piped
    own, targs = parse_args(argv)
    torch.set_num_threads(targs.threads)
    corpus = fortunes_data.load(targs.data_dir)
    os.makedirs(own.out_dir, exist_ok=True)
    csv_path = os.path.join(own.out_dir, "lr_sweep.csv")
    rows = read_csv(csv_path) if own.resume or own.report_only else []
    for extra in filter(None, own.merge.split(",")):
        have = {_key(r["optimizer"], float(r["matrix_lr"])) for r in rows}
        rows += [r for r in read_csv(extra) if _key(r["optimizer"], float(r["matrix_lr"])) not in have]
    done = {_key(r["optimizer"], float(r["matrix_lr"])) for r in rows}
    plan = [(n, optimizers.DEFAULT_MATRIX_LR[n] * m, m) for n in own.optimizers for m in own.multipliers]
    if own.report_only:
        plan = []
    try:
        from tqdm import tqdm
        # disable=None: no bar when stderr is not a terminal (a log gets no redraws)
        bar = tqdm(plan, unit="run", dynamic_ncols=True, disable=None)
    except ImportError:
        bar = plan
    for name, lr, mult in bar:
        if _key(name, lr) in done:
            continue
        if hasattr(bar, "set_description"):
            bar.set_description(f"{name} lr={lr:.3g}")
        res = train_gpt.train_one(targs, name, corpus, lr, progress=False)
        tail = res["rows"][-max(1, len(res["rows"]) // 10):]
        rows.append({
            "optimizer": name, "matrix_lr": f"{lr:.6g}", "lr_multiplier": f"{mult:g}",
            "final_val_loss": f"{res['final_val']:.6f}",
            "final_train_loss": f"{sum(r['train_loss'] for r in tail) / len(tail):.6f}",
            "diverged": "1" if res["diverged"] else "0", "seconds": f"{res['seconds']:.1f}",
        })
        write_csv(csv_path, rows)  # after every run: an interrupted sweep keeps its results
    order = {n: i for i, n in enumerate(own.optimizers)}
    rows.sort(key=lambda r: (order.get(r["optimizer"], len(order)), r["optimizer"], float(r["matrix_lr"])))
    write_csv(csv_path, rows)  # every run, also of optimizers not asked for this time
    rows = [r for r in rows if r["optimizer"] in order]  # the report: those asked for
    md_path = os.path.join(own.out_dir, "lr_sweep.md")
    with open(md_path, "w") as f:
        f.write(markdown(rows))
    png = os.path.join(own.out_dir, "lr_sweep.png")
    tokens = targs.batch_size * targs.seq_len
    plot(png, rows, f"TinyGPT d={targs.d_model} L={targs.layers}, {targs.steps} steps x {tokens} bytes, "
                    f"{targs.schedule} decay, seed {targs.seed}")
    print(markdown(rows))
    print(f"wrote {csv_path}, {md_path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
