"""Trains a small MLP with MDOptimizer on one data-parallel job: as a rank of torchrun
(gloo, mdopt.comm.torch_distributed()) or of mpirun (mdopt.comm.mpi()), each rank on its
own rows of every batch, or in one process as the reference: the same rows per "rank",
their gradients averaged by hand, on a local communicator. Run as a script (a rank) it
writes rank<r>.pt (per layout: the final weights and the bytes mdopt sent) into --out.

    python3 -m torch.distributed.run --standalone --nproc-per-node 2 dist_train.py --comm torch --out DIR
    mpirun -np 2 python3 dist_train.py --comm mpi --out DIR
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mdopt.comm  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402

DIMS = (16, 40, 24, 8)
ROWS_PER_RANK = 8
STEPS = 8


def model():
    torch.manual_seed(7)
    layers = []
    for i, (a, b) in enumerate(zip(DIMS[:-1], DIMS[1:])):
        lin = torch.nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.normal_(0.0, a ** -0.5)
            lin.bias.normal_(0.0, 0.1)
        layers.append(lin)
        if i + 2 < len(DIMS):
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def batch(step, world):
    g = torch.Generator().manual_seed(1000 + step)
    n = ROWS_PER_RANK * world
    return torch.randn(n, DIMS[0], generator=g), torch.randn(n, DIMS[-1], generator=g)


def optimizer(net, comm, layout):
    mats = [p for p in net.parameters() if p.dim() == 2]
    vecs = [p for p in net.parameters() if p.dim() == 1]
    return MDOptimizer([{"params": mats, "preset": "md-muon", "layout": layout, "name": "matrices"},
                        {"params": vecs, "preset": "vector", "name": "vectors"}],
                       comm=comm, threads=1, bucket_mb=0.002)


def shard_grads(net, x, y, r):
    """Gradients of the mean loss over rank r's rows."""
    net.zero_grad()
    rows = slice(r * ROWS_PER_RANK, (r + 1) * ROWS_PER_RANK)
    torch.nn.functional.mse_loss(net(x[rows]), y[rows]).backward()


def train_rank(comm, world, layout):
    """This rank's final weights and the bytes mdopt sent from it."""
    net = model()
    opt = optimizer(net, comm, layout)
    sent = 0
    for step in range(STEPS):
        x, y = batch(step, world)
        shard_grads(net, x, y, comm.rank)
        opt.step()
        sent += opt.last_step.bytes_sent
    return {n: p.detach().clone() for n, p in net.named_parameters()}, sent


def train_reference(world, layout):
    """One process: each step, every rank's gradient computed in turn and averaged."""
    net = model()
    opt = optimizer(net, mdopt.comm.local(), layout)
    params = list(net.parameters())
    for step in range(STEPS):
        x, y = batch(step, world)
        acc = [torch.zeros_like(p) for p in params]
        for r in range(world):
            shard_grads(net, x, y, r)
            for a, p in zip(acc, params):
                a += p.grad
        for a, p in zip(acc, params):
            p.grad.copy_(a / world)
        opt.step()
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def stall(comm, out):
    """Rank 1 never steps: rank 0's step must end with MDOPT_COMM_ERROR within its
    comm_timeout_s (2 s), naming the timeout, and its next step must fail at once. Rank 1 waits long enough for that, then leaves."""
    import time
    from mdopt import MdoptError
    net = model()
    mats = [p for p in net.parameters() if p.dim() == 2]
    vecs = [p for p in net.parameters() if p.dim() == 1]
    opt = MDOptimizer([{"params": mats, "preset": "md-muon"}, {"params": vecs, "preset": "vector"}],
                      comm=comm, threads=1, comm_timeout_s=2)
    x, y = batch(0, comm.size)
    shard_grads(net, x, y, comm.rank)
    result = {}
    if comm.rank == 0:
        t0 = time.monotonic()
        try:
            opt.step()
            result["first"] = ("no error", "")
        except MdoptError as e:
            result["first"] = (e.status, e.message)
        result["seconds"] = time.monotonic() - t0
        t0 = time.monotonic()
        try:
            opt.step()
            result["second"] = ("no error", "")
        except MdoptError as e:
            result["second"] = (e.status, e.message)
        result["second_seconds"] = time.monotonic() - t0
        torch.save(result, os.path.join(out, "stall.pt"))
    else:
        time.sleep(12)
    os._exit(0)  # the group is unusable after the failure: no collective teardown


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comm", choices=("torch", "mpi"), required=True)
    ap.add_argument("--layouts", default="rows,owner", help="one run per layout, in order")
    ap.add_argument("--out", required=True)
    ap.add_argument("--stall", action="store_true", help="rank 1 never steps (timeout test)")
    a = ap.parse_args()
    if a.comm == "torch":
        import torch.distributed as dist
        dist.init_process_group("gloo")
        comm = mdopt.comm.torch_distributed()
    else:
        comm = mdopt.comm.mpi()
    if a.stall:
        stall(comm, a.out)
    runs = {layout: train_rank(comm, comm.size, layout) for layout in a.layouts.split(",")}
    torch.save({"world": comm.size, "rank": comm.rank,
                "weights": {k: v[0] for k, v in runs.items()},
                "sent": {k: v[1] for k, v in runs.items()}},
               os.path.join(a.out, "rank%d.pt" % comm.rank))
    if a.comm == "torch":
        import torch.distributed as dist
        # Both ranks done before either tears gloo down: a rank whose peer has already
        # closed its connections can be aborted by gloo's transport.
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
