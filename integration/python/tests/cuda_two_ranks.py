"""Two ranks sharing one GPU against one rank (launch/device-check.sh runs it).

Both ranks put their tensors on cuda:0; their communicator is a host one (MPI, or gloo under
torchrun), so mdopt stages the step's collectives through pinned host memory
(comm/host_staged_communicator.h). A small MLP (matrices 256x64, 192x256, 32x192 and their
biases) trains 4 steps of mean-squared error on fixed batches of 64 rows; rank r takes rows
[32r, 32r + 32) (grads=local: mdopt averages the two halves). The one-rank reference takes
the gradient of each half separately, on the same GPU with the same kernels, and steps on
(g0 + g1) * 0.5: bit for bit the mean the two ranks reduce (one float32 addition, exact
halving), so what differs is only the sharded step itself.

Configurations (matrix preset, layout) and their bounds on max |W2 - W1| / max |W1| per
tensor after 4 steps:
  md-adamw rows            1e-5   (cross-row sums added in another order: float32 rounding)
  md-muon rows, owner      2e-3   (the same, then bf16 Newton-Schulz, where one flipped
                                   rounding moves an element by a bf16 ulp of the update)
  md-muon rows, overlap    bit for bit equal to md-muon rows at 2 ranks (gradients reported
                           from backward hooks through mdopt_grads_ready on torch's stream,
                           weights gathered by mdopt_gather_params)
and at 2 ranks both ranks end with bit-identical weights. These bounds are first estimates
(no GPU run has measured them yet); each measured value is printed as an MDOPT_METRIC line.

  python3 cuda_two_ranks.py --probe                        # under mpirun -np 2: MPI works?
  python3 cuda_two_ranks.py --ranks 1 --out DIR            # the reference
  mpirun -np 2 python3 cuda_two_ranks.py --comm mpi --out DIR
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 \\
      cuda_two_ranks.py --comm torch --out DIR
  python3 cuda_two_ranks.py --compare REF_DIR TWO_DIR      # exit 0 when every bound holds
--device cpu runs the same on the CPU backend (threads=1), for trying the script without a
GPU; the bounds are the GPU's.
"""
import argparse
import os
import sys

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

STEPS = 4
DIMS = (64, 256, 192, 32)
ROWS = 64
CONFIGS = [  # name, matrix preset, layout, overlap, bound (None: bit for bit vs `equal_to`)
    ("md-adamw.rows", "md-adamw", "rows", False, 1e-5),
    ("md-muon.rows", "md-muon", "rows", False, 2e-3),
    ("md-muon.owner", "md-muon", "owner", False, 2e-3),
    ("md-muon.rows.overlap", "md-muon", "rows", True, None),
]


def probe():
    import mdopt
    comm = mdopt.comm.mpi()
    print("probe: rank %d of %d, %s" % (comm.rank, comm.size, mdopt.library_path), flush=True)
    comm.close()


def make(comm, preset, layout, overlap, device):
    import torch
    from helpers import mlp
    from mdopt.torch import MDOptimizer
    model = mlp(31, dims=DIMS).to(device)
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    groups = [{"params": [m.weight for m in lin], "preset": preset, "layout": layout,
               "name": "matrices"},
              {"params": [m.bias for m in lin], "preset": "vector", "name": "vectors"}]
    kw = dict(comm=comm, comm_timeout_s=60)
    if torch.device(device).type == "cpu":
        kw["threads"] = 1
    if overlap:
        kw.update(overlap=True, gather="deferred", bucket_mb=0.01)
    return model, MDOptimizer(groups, **kw)


def half_grads(model, t, half, device):
    import torch
    from helpers import batch
    x, y = batch(700 + t, n=ROWS, d_in=DIMS[0], d_out=DIMS[-1])
    rows = slice(half * ROWS // 2, (half + 1) * ROWS // 2)
    model.zero_grad(set_to_none=True)
    torch.nn.functional.mse_loss(model(x[rows].to(device)), y[rows].to(device)).backward()


def run(args):
    import torch
    import mdopt
    if args.ranks == 1:
        comm = mdopt.comm.local()
    elif args.comm == "mpi":
        comm = mdopt.comm.mpi()
    else:
        import torch.distributed as dist
        dist.init_process_group("gloo")
        comm = mdopt.comm.torch_distributed()
    rank, size = comm.rank, comm.size
    if size != args.ranks:
        sys.exit("cuda_two_ranks: %d ranks, expected %d" % (size, args.ranks))
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    out = {}
    for name, preset, layout, overlap, _ in CONFIGS:
        if size == 1 and overlap:
            continue
        model, opt = make(comm, preset, layout, overlap, device)
        for t in range(STEPS):
            if size == 1:
                grads = []
                for half in (0, 1):
                    half_grads(model, t, half, device)
                    grads.append([p.grad.clone() for p in model.parameters()])
                for p, g0, g1 in zip(model.parameters(), *grads):
                    p.grad = (g0 + g1) * 0.5
            else:
                half_grads(model, t, rank, device)  # overlap: hooks report in backward
            opt.step()
            if overlap:
                opt.gather_params()
        info = opt.group_info("matrices")  # waits for the step's outcome
        out[name] = {"weights": [p.detach().cpu() for p in model.parameters()],
                     "orthogonalized": info.orthogonalized, "matrices": info.matrices}
        del opt, model
    os.makedirs(args.out, exist_ok=True)
    torch.save(out, os.path.join(args.out, "rank%d.pt" % rank))
    print("cuda_two_ranks: rank %d of %d (%s) wrote %s" % (rank, size, comm.kind,
                                                           ", ".join(out)), flush=True)
    comm.close()  # after every optimizer on it (MPI is finalised at exit)
    if args.ranks > 1 and args.comm == "torch":
        torch.distributed.destroy_process_group()


def compare(ref_dir, two_dir):
    import torch
    ref = torch.load(os.path.join(ref_dir, "rank0.pt"))
    r0 = torch.load(os.path.join(two_dir, "rank0.pt"))
    r1 = torch.load(os.path.join(two_dir, "rank1.pt"))
    failed = []
    for name, _, _, _, bound in CONFIGS:
        same = all(torch.equal(a, b) for a, b in zip(r0[name]["weights"], r1[name]["weights"]))
        print("MDOPT_METRIC two_ranks.%s.rank_mismatch %d 0" % (name, 0 if same else 1))
        if not same:
            failed.append("%s: the two ranks' weights differ" % name)
        if bound is None:
            base = name.rsplit(".", 1)[0]
            equal = all(torch.equal(a, b) for a, b in zip(r0[name]["weights"],
                                                          r0[base]["weights"]))
            print("MDOPT_METRIC two_ranks.%s.vs_%s_bits %d 0" % (name, base, 0 if equal else 1))
            if not equal:
                failed.append("%s: not bit for bit the plain %s run" % (name, base))
            continue
        err = max(((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
                  for a, b in zip(r0[name]["weights"], ref[name]["weights"]))
        print("MDOPT_METRIC two_ranks.%s.vs_one_rank %.6g %.6g" % (name, err, bound))
        if not err <= bound:
            failed.append("%s: %.3g from one rank (bound %.3g)" % (name, err, bound))
        if "muon" in name and r0[name]["orthogonalized"] != r0[name]["matrices"]:
            failed.append("%s: %d of %d matrices orthogonalized" % (
                name, r0[name]["orthogonalized"], r0[name]["matrices"]))
    for f in failed:
        print("cuda_two_ranks: FAIL " + f)
    print("cuda_two_ranks: %s" % ("FAIL" if failed else "PASS"))
    return 1 if failed else 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--probe", action="store_true")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--comm", choices=("mpi", "torch"), default="mpi")
    p.add_argument("--device", default="cuda:0",
                   help="cuda:0 (the check), or cpu to try this script where there is no GPU")
    p.add_argument("--out")
    p.add_argument("--compare", nargs=2, metavar=("REF_DIR", "TWO_DIR"))
    args = p.parse_args()
    if args.probe:
        return probe()
    if args.compare:
        return compare(*args.compare)
    if not args.out:
        p.error("--out is needed")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
