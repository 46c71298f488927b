"""Run under mpirun by test_mpi.py: every rank trains the same model on its share of each
batch (grads=local: mdopt averages the ranks' gradients), then saves a state_dict (which
holds the whole checkpoint on every rank); rank 0 writes the weights and the state_dict.
Usage: mpi_train.py OUT_FILE STATE_DIR STEPS"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import mdopt  # noqa: E402
from helpers import mlp, train  # noqa: E402
from mdopt.recipes import param_groups  # noqa: E402
from mdopt.torch import MDOptimizer  # noqa: E402

out, state_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(1)
try:
    comm = mdopt.comm.mpi()
except mdopt.MdoptError as e:
    if e.status == "MDOPT_UNSUPPORTED":
        print("mdopt: this libmdopt has no MPI communicator: %s" % e.message)
        sys.exit(77)
    raise
rank, size = comm.rank, comm.size
model = mlp(21)
opt = MDOptimizer(param_groups(model, matrix_preset="md-muon", lr=0.02), comm=comm,
                  threads=1, state_dir=state_dir)
n = 32  # the batch of helpers.batch, split into equal shares
share = slice(rank * n // size, (rank + 1) * n // size)
train(model, opt, steps, x_slice=share)
# The same run with gradients reported from backward hooks, and the weight gather deferred.
overlapped = mlp(21)
o2 = MDOptimizer(param_groups(overlapped, matrix_preset="md-muon", lr=0.02), comm=comm,
                 threads=1, overlap=True, gather="deferred", bucket_mb=0.001)
reported = []
_final = o2._grad_final


def counted(k):  # counts the hooks' reports
    reported.append(k)
    _final(k)


o2._grad_final = counted
for t in range(steps):
    from helpers import batch
    x, y = batch(100 + t)
    o2.zero_grad()
    torch.nn.functional.mse_loss(overlapped(x[share]), y[share]).backward()
    o2.step()
    o2.gather_params()
# An MoE layer, a module per expert: at the second step no rank routes a token to expert 1
# (its .grad is None everywhere: left as it was, state too) and only rank 0 to expert 2
# (rank 1 adds zeros to the mean: it steps).
torch.manual_seed(5)
experts = [torch.nn.Linear(8, 8, bias=False) for _ in range(3)]
o3 = MDOptimizer([e.weight for e in experts], comm=comm, threads=1)
moe = {}
for t in range(3):
    x = torch.randn(8, 8)[rank * 8 // size:(rank + 1) * 8 // size]
    o3.zero_grad()
    routed = ([0, 2] if rank == 0 else [0]) if t == 1 else [0, 1, 2]
    for k in routed:
        experts[k](x * (k + 1)).square().mean().backward()
    before = [e.weight.detach().clone() for e in experts]
    o3.step()
    if t == 1:
        after = [e.weight.detach() for e in experts]
        moe = {"e1_kept": torch.equal(before[1], after[1]),
               "e0_moved": not torch.equal(before[0], after[0]),
               "e2_moved": not torch.equal(before[2], after[2]),
               "skipped": o3.group_info(0).skipped, "step": o3.last_step.step}
moe["e1_moved_after"] = not torch.equal(before[1], experts[1].weight)
sd = opt.state_dict()
info = opt.group_info("matrices")
if rank == 0:
    torch.save({"weights": [p.detach().clone() for p in model.parameters()], "sd": sd,
                "overlapped": [p.detach().clone() for p in overlapped.parameters()],
                "reported": len(reported), "params": len(list(overlapped.parameters())),
                "size": size, "step": opt.last_step.step, "orthogonalized": info.orthogonalized,
                "bytes_sent": opt.last_step.bytes_sent, "moe": moe}, out)
opt = o2 = o3 = None
comm.close()
print("rank %d of %d: ok" % (rank, size))
