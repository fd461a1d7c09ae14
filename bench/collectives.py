"""How fast the GPUs of one host exchange a tensor-parallel engine's messages: all-reduce, all-gather and
reduce-scatter of bf16 tensors at the sizes a decode step sends (a batch's hidden states: 1024 × 2048 × 2 bytes
is 4 MiB), per NCCL protocol, and torch's symmetric-memory all-reduces (peer loads over NVLink) beside them.

A tensor-parallel decode step of the DeepSeek-V2-Lite shape all-reduces its hidden states twice a layer, so
the interconnect's time at those sizes bounds what a second GPU can add. Each protocol runs in fresh
processes (NCCL reads NCCL_PROTO once, at start). Times are the median of `--iterations` launches timed with
CUDA events on rank 0; bus bandwidth is NCCL's own measure (the bytes each rank moves over its link:
2(n-1)/n of the tensor for an all-reduce, (n-1)/n for the other two).

    python bench/collectives.py --ranks 2 --protocols default Simple LL LL128 symmetric-memory

JSON into bench/results/collectives-<device>-<ranks>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.engine.ranks import free_address  # noqa: E402

RESULTS_DIRECTORY = Path(__file__).resolve().parent / "results"
SYMMETRIC_MEMORY = "symmetric-memory"  # a --protocols value: torch's symmetric-memory all-reduces, not NCCL's
MIB = 1 << 20
BUS_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n,
              "reduce_scatter": lambda n: (n - 1) / n}


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sizes-mib", type=float, nargs="+", default=[0.25, 1, 4, 8, 16, 64])
    parser.add_argument("--protocols", nargs="+", default=["default", "Simple", "LL", "LL128"],
                        help=f"NCCL_PROTO values; 'default' leaves NCCL to choose; '{SYMMETRIC_MEMORY}' times torch's "
                             "symmetric-memory one-shot and two-shot all-reduces instead")
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--output", type=Path)
    return parser.parse_args()


def run_collective(name: str, tensor: torch.Tensor, size: int) -> None:
    if name == "all_reduce":
        dist.all_reduce(tensor)
    elif name == "all_gather":
        dist.all_gather_into_tensor(tensor, tensor.view(size, -1)[dist.get_rank()])
    else:
        dist.reduce_scatter_tensor(tensor.view(size, -1)[dist.get_rank()], tensor)


def time_collective(name: str, num_bytes: int, size: int, iterations: int) -> float:
    """Median microseconds of one collective over a bf16 tensor of `num_bytes` (the whole, gathered size)."""
    tensor = torch.ones(num_bytes // 2, dtype=torch.bfloat16, device="cuda")
    for _ in range(5):
        run_collective(name, tensor, size)
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        run_collective(name, tensor, size)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def time_symmetric_memory(kind: str, num_bytes: int, iterations: int) -> float:
    """Median microseconds of torch's symmetric-memory all-reduce (each rank reads its peers' buffers over
    NVLink, no NCCL kernel): `one_shot` (every rank reads every other's whole buffer) or `two_shot` (reduce-
    scatter then all-gather). Multicast stays off: these read peer memory with plain loads."""
    import torch.distributed._symmetric_memory as symmetric_memory

    buffer = symmetric_memory.empty(num_bytes // 2, dtype=torch.bfloat16, device="cuda").fill_(1)
    symmetric_memory.rendezvous(buffer, dist.group.WORLD)
    group_name = dist.group.WORLD.group_name
    if kind == "one_shot":
        def run() -> None:
            torch.ops.symm_mem.one_shot_all_reduce(buffer, "sum", group_name)
    else:
        def run() -> None:
            torch.ops.symm_mem.two_shot_all_reduce_(buffer, "sum", group_name)
    for _ in range(5):
        run()
    times = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def symmetric_memory_rows(size: int, arguments: argparse.Namespace) -> list[dict]:
    rows = []
    for kind in ("one_shot", "two_shot"):
        for size_mib in arguments.sizes_mib:
            num_bytes = int(size_mib * MIB) // (2 * size) * 2 * size
            try:
                microseconds = time_symmetric_memory(kind, num_bytes, arguments.iterations)
            except Exception as error:  # noqa: BLE001 - recorded: the host may not allow it
                rows.append({"collective": f"symm_mem_{kind}_all_reduce", "mib": size_mib,
                             "error": f"{type(error).__name__}: {error}"[:300]})
                continue
            rows.append({"collective": f"symm_mem_{kind}_all_reduce", "mib": size_mib,
                         "microseconds": round(microseconds, 1),
                         "bus_gb_s": round(num_bytes * BUS_FACTOR["all_reduce"](size) / microseconds / 1000, 1)})
    return rows


def rank_main(rank: int, size: int, address: str, protocol: str, arguments: argparse.Namespace, queue) -> None:
    if protocol not in ("default", SYMMETRIC_MEMORY):
        os.environ["NCCL_PROTO"] = protocol
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=address, rank=rank, world_size=size,
                            device_id=torch.device("cuda", rank))
    if protocol == SYMMETRIC_MEMORY:
        rows = symmetric_memory_rows(size, arguments)
        if rank == 0:
            queue.put(rows)
        dist.destroy_process_group()
        return
    rows = []
    for name in BUS_FACTOR:
        for size_mib in arguments.sizes_mib:
            num_bytes = int(size_mib * MIB) // (2 * size) * 2 * size
            microseconds = time_collective(name, num_bytes, size, arguments.iterations)
            rows.append({"collective": name, "mib": size_mib, "microseconds": round(microseconds, 1),
                         "bus_gb_s": round(num_bytes * BUS_FACTOR[name](size) / microseconds / 1000, 1)})
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def main() -> None:
    arguments = parse_arguments()
    context = mp.get_context("spawn")
    results = {"device": torch.cuda.get_device_name(0), "ranks": arguments.ranks, "torch": torch.__version__,
               "nccl": ".".join(map(str, torch.cuda.nccl.version())), "iterations": arguments.iterations,
               "protocols": {}}
    for protocol in arguments.protocols:
        queue, address = context.Queue(), free_address()
        processes = [context.Process(target=rank_main, args=(rank, arguments.ranks, address, protocol, arguments,
                                                             queue)) for rank in range(arguments.ranks)]
        for process in processes:
            process.start()
        rows = queue.get()
        for process in processes:
            process.join()
        results["protocols"][protocol] = rows
        for row in rows:
            print(protocol, row, flush=True)
    device = results["device"].lower().replace(" ", "-")
    output = arguments.output or RESULTS_DIRECTORY / f"collectives-{device}-{arguments.ranks}.json"
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
