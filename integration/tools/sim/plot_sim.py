#!/usr/bin/env python3
"""Plots mdopt-sim's CSV: exposed communication and overhead against AdamW vs GPU count,
one line per (model, layout). Usage: plot_sim.py mdopt-sim.csv OUT_DIR (writes
exposed_comm.png and overhead.png there)."""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot_sim.py mdopt-sim.csv OUT_DIR")
    with open(sys.argv[1], newline="") as f:
        rows = list(csv.DictReader(f))
    lines = {}
    for r in rows:
        key = (r["model"], r["preset"], r["layout"])
        lines.setdefault(key, []).append(r)
    for column, ylabel, name in (
        ("exposed_comm_ms", "exposed communication per step (ms)", "exposed_comm.png"),
        ("overhead_pct", "iteration time over AdamW's (%)", "overhead.png"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (model, preset, layout), pts in sorted(lines.items()):
            if column == "overhead_pct" and preset == "adamw":
                continue  # the baseline is 0 by definition
            pts.sort(key=lambda r: int(r["gpus"]))
            ax.plot([int(r["gpus"]) for r in pts], [float(r[column]) for r in pts], marker="o",
                    label=f"{model}, {preset}, {layout}")
        ax.set_xscale("log", base=2)
        # Log scales: the owner layout's padded collectives run orders of magnitude above
        # the rows layout (symlog only where an overhead is negative).
        values = [float(r[column]) for pts in lines.values() for r in pts
                  if not (column == "overhead_pct" and r["preset"] == "adamw")]
        if values and min(values) > 0:
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel("GPUs")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(sys.argv[2], name), dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
