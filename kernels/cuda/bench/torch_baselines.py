"""torch's baselines for mdopt-cuda-bench, on the same GPT-shaped set (DESIGN.md section 8:
d=2048, 8 layers, ffn 4x, the hidden matrices only), float32 parameters and gradients:
  - torch.optim.AdamW(fused=True), betas (0.9, 0.95): the md-adamw comparison;
  - torch.optim.Muon (when this torch has it): the md-muon comparison;
  - torch's bf16 Newton-Schulz (the quintic iteration torch.optim.Muon and modded-nanogpt
    run, one matrix at a time, 5 steps): the comparison for Newton-Schulz alone, over all
    matrices and per shape (mdopt-cuda-bench prints the same per shape).
Each is timed with CUDA events: `warmup` untimed steps, then the mean and min of `iters`.
Prints one JSON object.

  python3 torch_baselines.py [--d 2048] [--layers 8] [--warmup 3] [--iters 10]
"""
import argparse
import json

import torch


def shapes(d, layers):
    out = []
    for _ in range(layers):
        out += [(d, d)] * 4 + [(4 * d, d), (d, 4 * d)]
    return out


def timed(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sum(times) / len(times), min(times)


def ns_bf16(g, steps=5, eps=1e-7):
    """The quintic Newton-Schulz of torch.optim.Muon / modded-nanogpt, in bf16."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.bfloat16()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * A @ A
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=2048)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "needs a CUDA GPU"}))
        return
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sh = shapes(args.d, args.layers)
    out = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
           "params": sum(m * n for m, n in sh)}

    def make_params():
        ps = [torch.nn.Parameter(torch.randn(m, n, device=dev) / n ** 0.5) for m, n in sh]
        for q in ps:
            q.grad = torch.randn_like(q) * 1e-3
        return ps

    ps = make_params()
    opt = torch.optim.AdamW(ps, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    out["torch_fused_adamw_ms"], out["torch_fused_adamw_min_ms"] = timed(opt.step, args.warmup, args.iters)
    del opt, ps
    torch.cuda.empty_cache()

    if hasattr(torch.optim, "Muon"):
        ps = make_params()
        opt = torch.optim.Muon(ps, lr=2e-2, momentum=0.95, nesterov=True, ns_steps=5)
        out["torch_muon_ms"], out["torch_muon_min_ms"] = timed(opt.step, args.warmup, args.iters)
        del opt, ps
        torch.cuda.empty_cache()
    else:
        out["torch_muon_ms"] = None
        out["torch_muon_note"] = "this torch has no torch.optim.Muon"

    gs = [torch.randn(m, n, device=dev) for m, n in sh]
    with torch.no_grad():
        out["torch_ns_bf16_ms"], out["torch_ns_bf16_min_ms"] = timed(
            lambda: [ns_bf16(g) for g in gs], args.warmup, args.iters)
        # Per shape, to set beside mdopt-cuda-bench's ns_shapes.
        out["torch_ns_bf16_shapes"] = []
        for m, n in sorted(set(sh)):
            mine = [g for g in gs if tuple(g.shape) == (m, n)]
            ms, _ = timed(lambda: [ns_bf16(g) for g in mine], args.warmup, args.iters)
            out["torch_ns_bf16_shapes"].append({"m": m, "n": n, "batch": len(mine), "ms": ms})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
