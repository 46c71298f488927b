#!/usr/bin/env python3
"""mdopt's optimizer on CUDA tensors against torch's, in one process, on one GPU.

The set is torch_baselines.py's GPT shape list (DESIGN.md section 8): d=2048, 8 layers,
per layer q, k, v, o (2048 x 2048) and fc1 (8192 x 2048), fc2 (2048 x 8192): 48 matrices,
402,653,184 parameters, float32 weights and float32 gradients (fixed random values, the
same for both sides of a comparison). mdopt runs through its Python binding
(mdopt.torch.MDOptimizer on the CUDA tensors: device=cuda:0, torch's current stream, no
host wait in step()); torch's optimizers on copies of the same tensors:

  md-adamw (preset md-adamw)          vs torch.optim.AdamW(fused=True)            goal <= 1.3x
  md-muon  (preset md-muon, 5 NS steps) vs torch.optim.Muon(ns_steps=5)           goal <= 0.75x
  beside them: torch's bf16 Newton-Schulz alone over the same matrices (the quintic of
  torch_baselines.py), for the Newton-Schulz ratio of mdopt-cuda-bench

Per optimizer: device time per step (CUDA events recorded around the step call: mean and
minimum of --iters steps after --warmup untimed ones; a step's kernels and any gaps the host
leaves between them), host time per step (time.perf_counter around the step call, no
synchronisation: how long the call holds the Python thread), and optimizer state in bytes
per parameter (mdopt: mdopt_state_bytes / parameters; torch: the bytes of every tensor in
optimizer.state / parameters; taken after the first step). The two optimizers of a
comparison step in turn, one step each per round, so drift lands on both. Ratios are
mdopt's mean device time over torch's.

Prints one JSON object (stdout, or --json FILE) and a table (stderr, or stdout with --json).
Without a CUDA GPU, or with a libmdopt that has no CUDA backend, it prints
{"skipped": "<why>"} and exits 0. --device cpu runs the same comparisons on the CPU (wall
time stands for device time; for trying the script where there is no GPU, at a small --d).

  python3 kernels/cuda/bench/optimizer_bench.py [--d 2048] [--layers 8] [--warmup 3]
      [--iters 10] [--json FILE] [--device cuda:0|cpu]
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..", "..", "integration",
                                                 "python")))

import torch  # noqa: E402

from torch_baselines import ns_bf16, shapes  # noqa: E402

GOALS = {"md-adamw": ("torch-adamw-fused", 1.3), "md-muon": ("torch-muon", 0.75)}


def make_params(sh, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    ps = []
    for m, n in sh:
        p = torch.nn.Parameter(torch.randn(m, n, device=device, generator=g) / n ** 0.5)
        p.grad = torch.randn(m, n, device=device, generator=g) * 1e-3
        ps.append(p)
    return ps


def state_bytes_torch(opt, params):
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total / sum(p.numel() for p in params)


def timed_pair(steps, warmup, iters, cuda=True):
    """steps: {name: fn}. Warms each up, then times one step of each per round."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    if cuda:
        torch.cuda.synchronize()
    dev = {k: [] for k in steps}
    host = {k: [] for k in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            if cuda:
                a = torch.cuda.Event(enable_timing=True)
                b = torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            fn()
            host[name].append((time.perf_counter() - t0) * 1e3)
            if cuda:
                b.record()
                b.synchronize()
                dev[name].append(a.elapsed_time(b))
            else:
                dev[name].append(host[name][-1])
    return {k: {"device_ms_mean": sum(dev[k]) / iters, "device_ms_min": min(dev[k]),
                "host_ms_mean": sum(host[k]) / iters, "host_ms_min": min(host[k])}
            for k in steps}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", help="write the JSON object here (the table then goes to stdout)")
    p.add_argument("--device", default="cuda:0")
    args = p.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    table_out = sys.stdout if args.json else sys.stderr

    def emit(obj):
        text = json.dumps(obj, indent=1)
        if args.json:
            with open(args.json, "w") as f:
                f.write(text + "\n")
        else:
            print(text)

    if cuda and not torch.cuda.is_available():
        emit({"skipped": "no CUDA GPU visible to torch %s" % torch.__version__})
        return 0
    import mdopt
    from mdopt.torch import MDOptimizer
    if cuda:
        ok, why = mdopt.cuda_backend(dev.index or 0)
        if not ok:
            emit({"skipped": "libmdopt (%s) cannot run on CUDA: %s"
                  % (mdopt.library_path, why)})
            return 0
        torch.cuda.set_device(dev)
    sh = shapes(args.d, args.layers)
    nparams = sum(m * n for m, n in sh)
    out = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu",
           "torch": torch.__version__,
           "mdopt": mdopt.version(), "mdopt_runtime": mdopt.runtime_info(),
           "shapes": "d=%d layers=%d (q, k, v, o, fc1, fc2 per layer)" % (args.d, args.layers),
           "matrices": len(sh), "params": nparams, "dtype": "float32 weights and gradients",
           "warmup": args.warmup, "iters": args.iters, "results": {}, "ratios": []}
    res = out["results"]

    # md-adamw vs fused AdamW.
    ours, theirs = make_params(sh, dev, 1), make_params(sh, dev, 1)
    md = MDOptimizer(ours, preset="md-adamw", lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    tadam = torch.optim.AdamW(theirs, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                              fused=True)
    res.update(timed_pair({"md-adamw": md.step, "torch-adamw-fused": tadam.step},
                          args.warmup, args.iters, cuda))
    res["md-adamw"]["state_bytes_per_param"] = md.mdopt.state_bytes() / nparams
    res["md-adamw"]["workspace_bytes"] = md.mdopt.workspace_bytes()
    res["torch-adamw-fused"]["state_bytes_per_param"] = state_bytes_torch(tadam, theirs)
    del md, tadam, ours, theirs
    if cuda:
        torch.cuda.empty_cache()

    # md-muon vs torch.optim.Muon, 5 Newton-Schulz steps each (both in bf16).
    if hasattr(torch.optim, "Muon"):
        ours, theirs = make_params(sh, dev, 2), make_params(sh, dev, 2)
        md = MDOptimizer(ours, preset="md-muon", ns_steps=5)
        tmuon = torch.optim.Muon(theirs, lr=2e-2, weight_decay=0.0, momentum=0.95,
                                 nesterov=True, ns_steps=5)
        res.update(timed_pair({"md-muon": md.step, "torch-muon": tmuon.step},
                              args.warmup, args.iters, cuda))
        res["md-muon"]["state_bytes_per_param"] = md.mdopt.state_bytes() / nparams
        res["md-muon"]["workspace_bytes"] = md.mdopt.workspace_bytes()
        res["torch-muon"]["state_bytes_per_param"] = state_bytes_torch(tmuon, theirs)
        del md, tmuon, ours, theirs
        if cuda:
            torch.cuda.empty_cache()
    else:
        out["note"] = "torch %s has no torch.optim.Muon: md-muon not compared" % torch.__version__

    # torch's bf16 Newton-Schulz alone (5 quintic steps, one matrix at a time).
    gs = [torch.randn(m, n, device=dev) for m, n in sh]
    with torch.no_grad():
        res.update(timed_pair({"torch-ns-bf16": lambda: [ns_bf16(g) for g in gs]},
                              args.warmup, args.iters, cuda))
    del gs

    for ours_name, (theirs_name, goal) in GOALS.items():
        if ours_name in res and theirs_name in res:
            r = res[ours_name]["device_ms_mean"] / res[theirs_name]["device_ms_mean"]
            out["ratios"].append({"name": "%s / %s" % (ours_name, theirs_name),
                                  "ratio": r, "goal": goal, "met": r <= goal,
                                  "host_ratio": res[ours_name]["host_ms_mean"] /
                                  res[theirs_name]["host_ms_mean"]})
    emit(out)

    w = table_out.write
    w("%s, torch %s, mdopt %s; %d matrices, %d parameters (%s), mean of %d steps after %d\n"
      % (out["device"], out["torch"], out["mdopt"], len(sh), nparams, out["shapes"],
         args.iters, args.warmup))
    w("%-18s %12s %12s %12s %14s\n" % ("optimizer", "device ms", "min ms", "host ms",
                                       "state B/param"))
    for name, r in res.items():
        sb = r.get("state_bytes_per_param")
        w("%-18s %12.3f %12.3f %12.3f %14s\n" % (name, r["device_ms_mean"], r["device_ms_min"],
                                                r["host_ms_mean"],
                                                "-" if sb is None else "%.2f" % sb))
    for r in out["ratios"]:
        w("%-32s %6.2fx (goal <= %.2fx: %s; host time %.2fx)\n"
          % (r["name"], r["ratio"], r["goal"], "met" if r["met"] else "NOT met",
             r["host_ratio"]))
    if out.get("note"):
        w(out["note"] + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
