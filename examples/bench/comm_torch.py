#!/usr/bin/env python3
"""Reference for helix_bench_comm: all-reduce (sum) and all-gather bus bandwidth of NCCL driven by
torch.distributed, f32, the same sizes, iterations and conventions as tests/bench/comm.cpp (median of
the slowest rank's wall time per call after a barrier; busbw = algbw * 2(n-1)/n for all-reduce,
algbw * (n-1)/n for all-gather; bytes = the whole buffer). Launched one process per GPU by mpirun
(ranks from OMPI_COMM_WORLD_*), e.g.
  mpirun -np 2 -x NCCL_NVLS_ENABLE=0 python3 examples/bench/comm_torch.py --max-mb 1024
One JSON line per (op, bytes) from rank 0."""
import argparse
import json
import os
import time

import torch
import torch.distributed as dist


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--min-mb", type=float, default=1)
    ap.add_argument("--max-mb", type=float, default=1024)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--port", type=int, default=29531)
    a = ap.parse_args()
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("RANK", 0)))
    world = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{a.port}", rank=rank, world_size=world,
                            device_id=torch.device("cuda", torch.cuda.current_device()))
    n = float(world)
    mb = a.min_mb
    while mb <= a.max_mb * 1.0001:
        elems = max(world, int(mb * 1024 * 1024 / 4) // world * world)
        buf = torch.zeros(elems, dtype=torch.float32, device="cuda")
        part = torch.zeros(elems // world, dtype=torch.float32, device="cuda")
        for op, factor in (("all_reduce", 2 * (n - 1) / n), ("all_gather", (n - 1) / n)):
            times = []
            for i in range(a.warmup + a.iters):
                dist.barrier()
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if op == "all_reduce":
                    dist.all_reduce(buf)
                else:
                    dist.all_gather_into_tensor(buf, part)
                torch.cuda.synchronize()
                if i >= a.warmup:
                    times.append(time.perf_counter() - t0)
            t = torch.tensor(times, dtype=torch.float64, device="cuda")
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            s = sorted(t.tolist())[len(times) // 2]
            algbw = elems * 4 / s / 1e9
            if rank == 0:
                print(json.dumps({"bench": "comm", "side": "torch", "backend": "nccl", "ranks": world, "op": op,
                                  "bytes": elems * 4, "us": round(s * 1e6, 1), "algbw_gbps": round(algbw, 2),
                                  "busbw_gbps": round(algbw * factor, 2)}), flush=True)
        mb *= 2
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
