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
sd = opt.state_dict()
info = opt.group_info("matrices")
if rank == 0:
    torch.save({"weights": [p.detach().clone() for p in model.parameters()], "sd": sd,
                "size": size, "step": opt.last_step.step, "orthogonalized": info.orthogonalized,
                "bytes_sent": opt.last_step.bytes_sent}, out)
opt = None
comm.close()
print("rank %d of %d: ok" % (rank, size))
