#!/usr/bin/env python3
"""mdopt against PyTorch's optimizers on the same tensors, in one process.

The set is the hidden matrices of a GPT (default d=1024, 4 layers: per layer q (d,d),
k (d/4,d), v (d/4,d), o (d,d), fc1 (4d,d), fc2 (d,4d); 44.0 M parameters), f32 weights and
gradients, fixed random gradients. Every optimizer gets its own copy of the same weights and
the same gradients, torch.set_num_threads(--threads) and mdopt's threads= option set alike.
The optimizers of one comparison step in turn, once per round (the order rotates), each
step timed alone: the machine's drift lands on baseline and candidate alike, and a ratio is
the median over --steps rounds of candidate time / baseline time in the same round.

Comparisons (ratio = mdopt / torch; below 1 is faster):
  adamw  md-adamw, adamw   vs torch.optim.AdamW(fused=True); beside them the floor: md-adamw's
                           40 B per parameter moved by torch's own kernels (_foreach_norm of G,
                           fused AdamW, _foreach_mul_ of W), no projection math
  muon   md-muon, muon     vs torch.optim.Muon with ns_dtype=bf16, where the CPU has bf16 GEMM
                           (AVX512_BF16 or AMX; torch.optim.Muon's bf16 products fall back to
                           a slow path elsewhere), and in float32 (mdopt's default) vs the
                           same algorithm in torch with f32 products, on every CPU
  ns     Newton-Schulz alone, f32: torch's 5 quintic iterations per gradient vs mdopt's muon
         with momentum 0 and no weight decay (NS and one elementwise pass)
Beside them: the machine's copy bandwidth and f32 GEMM rate measured here, each AdamW step's
achieved GB/s from the bytes it moves per parameter, counted by construction (torch: read
W, G, m, v, write W, m, v = 28 B; mdopt adamw: 4 B more for the finite check that reads G
before any state changes = 32 B; md-adamw: that, and one more read and write of the weights
for the projection and gains = 40 B, less whatever the finishing pass finds in cache) and
each Muon step's Newton-Schulz GFLOP/s (5 quintic iterations counted as general GEMMs).

  python3 integration/tools/compare_torch.py --threads 2 --steps 5
"""
import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))

import torch  # noqa: E402

import mdopt  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402

BYTES_PER_PARAM = {"adamw": 28, "mdopt-adamw": 32, "md-adamw": 40}


def shapes(d, layers):
    out = []
    for l in range(layers):
        for name, (m, n) in (("q", (d, d)), ("k", (d // 4, d)), ("v", (d // 4, d)),
                             ("o", (d, d)), ("fc1", (4 * d, d)), ("fc2", (d, 4 * d))):
            out.append(("layer%d.%s" % (l, name), (m, n)))
    return out


def cpu_has_bf16_gemm():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def make_params(shape_list, seed):
    g = torch.Generator().manual_seed(seed)
    params = []
    for _, (m, n) in shape_list:
        p = torch.nn.Parameter(torch.randn(m, n, generator=g) / n ** 0.5)
        p.grad = torch.randn(m, n, generator=g) * 1e-2
        params.append(p)
    return params


def interleaved(opts, rounds, warmup):
    """Step every optimizer once per round, in an order that rotates each round, and time each
    step alone. The machine's speed drifts (other tenants, frequency); stepping the baseline
    and the candidates side by side puts the same drift on both, and a candidate's ratio is
    the median over rounds of its time / the baseline's time in the same round."""
    times = [[] for _ in opts]
    for r in range(warmup + rounds):
        for k in range(len(opts)):
            i = (k + r) % len(opts)
            t0 = time.perf_counter()
            opts[i].step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[i].append(dt)
    return times


class TorchMuonF32(torch.optim.Optimizer):
    """torch.optim.Muon's algorithm with f32 products (same coefficients and steps)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.1, ns_steps=5):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      ns_steps=ns_steps))

    @staticmethod
    def orthogonalize(g, steps):
        a, b, c = 3.4445, -4.7750, 2.0315
        x = g / (g.norm() + 1e-7)
        tall = x.size(0) > x.size(1)
        if tall:
            x = x.T
        for _ in range(steps):
            A = x @ x.T
            B = torch.addmm(A, A, A, beta=b, alpha=c)
            x = torch.addmm(x, B, x, beta=a)
        return x.T if tall else x

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                buf = st.setdefault("momentum_buffer", torch.zeros_like(p))
                buf.lerp_(p.grad, 1 - group["momentum"])
                u = p.grad.lerp(buf, group["momentum"])  # nesterov
                o = self.orthogonalize(u, group["ns_steps"])
                m, n = p.shape
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(o, alpha=-group["lr"] * max(1.0, m / n) ** 0.5)


class TorchMdAdamwTraffic:
    """md-adamw's memory traffic in torch's own kernels: the finite check's read of G
    (_foreach_norm), fused AdamW (read W, G, m, v; write W, m, v) and the finishing pass's
    read and write of W (_foreach_mul_): 40 B per parameter, no projection math. What torch's
    kernels would need for the bytes md-adamw must move: a floor measured on this machine."""

    def __init__(self, params):
        self.params = list(params)
        self.adamw = torch.optim.AdamW(self.params, lr=1e-3, weight_decay=0.1, fused=True)

    @torch.no_grad()
    def step(self):
        torch._foreach_norm([p.grad for p in self.params])
        self.adamw.step()
        torch._foreach_mul_(self.params, 1.0)


class TorchNsOnly(torch.optim.Optimizer):
    """Newton-Schulz alone: each gradient orthogonalised, nothing else (the result is kept)."""

    def __init__(self, params, ns_steps=5):
        super().__init__(params, dict(ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["o"] = TorchMuonF32.orthogonalize(p.grad, group["ns_steps"])


def copy_bandwidth(mib=512, reps=5):
    src = torch.ones(mib * (1 << 20) // 4)
    dst = torch.empty_like(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(reps))
    return 2 * src.numel() * 4 / best / 1e9


def gemm_rate(n=2048, reps=3, dtype=torch.float32):
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def ns_flops(shape_list, steps=5):
    total = 0
    for _, (m, n) in shape_list:
        s, l = min(m, n), max(m, n)
        # per iteration: X X^T (2 s^2 l), A A (2 s^3), B X (2 s^2 l)
        total += steps * (4 * s * s * l + 2 * s ** 3)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    ap.add_argument("--repeat", type=int, default=1,
                    help="measure each comparison this many times on the same optimizers")
    ap.add_argument("--pairs", default="adamw,muon,ns",
                    help="which comparisons: adamw (md-adamw, adamw vs fused AdamW), muon "
                         "(md-muon, muon vs torch's Muon; in bf16 too where the CPU has it), "
                         "ns (Newton-Schulz alone)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    sl = shapes(args.d_model, args.layers)
    nparams = sum(m * n for _, (m, n) in sl)
    bf16 = cpu_has_bf16_gemm()
    print("mdopt %s (%s) vs torch %s, %d threads, %d matrices, %.1f M parameters, f32"
          % (mdopt.__version__ if hasattr(mdopt, "__version__") else "", mdopt.library_path,
             torch.__version__, args.threads, len(sl), nparams / 1e6))
    bw = copy_bandwidth()
    gf = gemm_rate()
    gf16 = gemm_rate(dtype=torch.bfloat16) if bf16 else None
    print("machine: copy %.1f GB/s (read + write, 512 MiB), f32 GEMM %.0f GFLOP/s (2048^3), "
          "bf16 GEMM in the CPU: %s" % (bw, gf, "%.0f GFLOP/s (torch, 2048^3)" % gf16
                                        if bf16 else "no"))

    rows = []

    def measure(title, baseline, candidates):
        """baseline and each candidate: (label, make(params) -> optimizer, bytes/flops kind)."""
        print(title)
        entries, params, opts = [], [], []
        for entry in [baseline] + candidates:
            p = make_params(sl, seed=1)
            try:
                opt = entry[1](p)
            except mdopt.MdoptError as e:  # e.g. ns_dtype=bf16 in a build without oneDNN
                print("  %-34s skipped: %s" % (entry[0], e))
                continue
            entries.append(entry)
            params.append(p)
            opts.append(opt)
        for rep in range(args.repeat):
            times = interleaved(opts, args.steps, args.warmup if rep == 0 else 0)
            base_ms = 1e3 * statistics.median(times[0])
            for k, ((label, _, kind), t) in enumerate(zip(entries, times)):
                med = statistics.median(t)
                row = {"step": label, "ms": 1e3 * med, "repeat": rep}
                if kind in BYTES_PER_PARAM:
                    row["GB/s"] = BYTES_PER_PARAM[kind] * nparams / med / 1e9
                if kind == "ns":
                    row["GFLOP/s"] = ns_flops(sl) / med / 1e9
                if k > 0:
                    row["vs"] = entries[0][0]
                    row["ratio"] = statistics.median(a / b for a, b in zip(t, times[0]))
                rows.append(row)
                print("  %-34s %10.1f ms%s%s" % (
                    label + (" [%d]" % rep if args.repeat > 1 else ""), row["ms"],
                    "  %5.1f GB/s" % row["GB/s"] if "GB/s" in row else
                    "  %5.1f GFLOP/s" % row["GFLOP/s"] if "GFLOP/s" in row else "",
                    "  %.2fx" % row["ratio"] if "ratio" in row else "  (baseline)"))
        del opts, params

    threads = "threads=%d" % args.threads
    pairs = set(args.pairs.split(","))
    md = lambda preset, opts=threads: (lambda p: MDOptimizer(p, preset=preset, options=opts))
    if "adamw" in pairs:
        measure("AdamW-based (ratio vs torch.optim.AdamW(fused=True)):",
                ("torch AdamW(fused=True)",
                 lambda p: torch.optim.AdamW(p, lr=1e-3, weight_decay=0.1, fused=True), "adamw"),
                [("mdopt md-adamw", md("md-adamw"), "md-adamw"),
                 ("mdopt adamw", md("adamw"), "mdopt-adamw"),
                 ("torch kernels, md-adamw's bytes", lambda p: TorchMdAdamwTraffic(p),
                  "md-adamw")])
    torch_muon = bf16 and hasattr(torch.optim, "Muon")
    f32_base = ("torch Muon, f32 products", lambda p: TorchMuonF32(p), "ns")
    f32_cands = [("mdopt md-muon", md("md-muon"), "ns"), ("mdopt muon", md("muon"), "ns")]
    if "muon" in pairs:
        if torch_muon:
            nsb = threads + " ns_dtype=bf16"
            measure("Muon-based, bf16 products (ratio vs torch.optim.Muon):",
                    ("torch.optim.Muon (bf16 NS)",
                     lambda p: torch.optim.Muon(p, lr=0.02, weight_decay=0.1), "ns"),
                    [("mdopt md-muon ns_dtype=bf16", md("md-muon", nsb), "ns"),
                     ("mdopt muon ns_dtype=bf16", md("muon", nsb), "ns")])
        measure("Muon-based, f32 products (ratio vs torch.optim.Muon's algorithm in f32):",
                f32_base, f32_cands)
    if "ns" in pairs:
        # Newton-Schulz alone: torch's orthogonalisation of each gradient against mdopt's
        # muon with momentum 0 and no weight decay (NS plus one elementwise pass, about 1 %
        # of the step), both f32.
        ns_opts = threads
        measure("Newton-Schulz alone, f32 products:",
                ("torch NS (f32 products)", lambda p: TorchNsOnly(p), "ns"),
                [("mdopt NS (muon, momentum=0)",
                  lambda p: MDOptimizer(p, preset="muon", momentum=0, nesterov=False,
                                        weight_decay=0, options=ns_opts), "ns")])
    print("ratio = median over rounds of mdopt / torch in the same round; GB/s from 28 B/param "
          "(torch AdamW), 32 (mdopt adamw), 40 (md-adamw); GFLOP/s: effective, the general-GEMM "
          "flops of 5 quintic Newton-Schulz iterations / step time (a symmetric product done "
          "as such costs half)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": args.threads, "repeat": args.repeat, "params": nparams, "copy_GBps": bw,
                       "gemm_GFLOPps": gf, "bf16_gemm": bf16, "bf16_gemm_GFLOPps": gf16, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
