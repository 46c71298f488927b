"""One rank of test_nccl_comm.py: joins a gloo group through a file store, runs one case of
mdopt.comm.nccl's id sharing or creation, and writes what happened (the id's bytes, or the
error's type and message) as JSON to <out>/rank<r>.json.

    python3 nccl_comm_worker.py CASE RANK WORLD STORE OUT
"""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mdopt  # noqa: E402
import mdopt.comm  # noqa: E402
from mdopt import MdoptError  # noqa: E402

# Bytes no ncclUniqueId would start with, zeros included (the id is binary, not a string).
FAKE_ID = bytes((7 * k + 3) % 256 for k in range(128))[:64] + bytes(64)


def main():
    case, rank, world, store, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=world)
    made = []

    def fake_id():
        made.append(rank)
        return FAKE_ID

    def no_nccl():
        made.append(rank)
        raise MdoptError("MDOPT_UNSUPPORTED", "this build of mdopt has no NCCL backend (test)")

    result = {}
    try:
        if case == "share":
            result["id"] = list(mdopt.comm._share_nccl_id(None, make_id=fake_id))
        elif case == "share_subgroup":
            # A group of global rank 1 alone: its rank 0 is global rank 1.
            group = dist.new_group([1])
            if rank == 1:
                result["id"] = list(mdopt.comm._share_nccl_id(group, make_id=fake_id))
        elif case == "share_error":
            mdopt.comm._share_nccl_id(None, make_id=no_nccl)
        elif case == "create":
            c = mdopt.comm.nccl()
            result["comm"] = [c.kind, c.rank, c.size]
            c.close()
        elif case == "optimizer":
            from mdopt.torch import MDOptimizer
            c = mdopt.comm.nccl()
            result["comm"] = [c.kind, c.rank, c.size]
            w = torch.nn.Parameter(torch.randn(8, 4))
            w.grad = torch.randn(8, 4)
            before = w.detach().clone()
            opt = MDOptimizer([w], preset="md-adamw", comm=c, threads=1)
            opt.step()
            result["moved"] = bool((w.detach() != before).any())
        else:
            raise SystemExit("unknown case " + case)
    except Exception as e:  # what the test asserts on
        result["error"] = [type(e).__name__, getattr(e, "status", None), str(e)]
    result["made_id"] = made
    dist.destroy_process_group()
    with open(os.path.join(out, "rank%d.json" % rank), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
