"""A whole CLAIR round at LLM shape: decomposition, detection and rank-r write-back of every client.

    python benchmarks/llm_round.py                 # 7B shape: d = 4096, 64 modules, K = 64, r = 16
    python benchmarks/llm_round.py --scaling       # K in (16, 64, 256) and r in (8, 16, 64)
    python benchmarks/llm_round.py --quick         # d = 1024, 8 modules, K = 32, r = 8

Each configuration runs in a fresh subprocess so its peak memory is its own: peak resident set
size (``ru_maxrss``) against the RSS before the inputs were built, compared with the bytes of
the input factors. Time: ``clair_aggregate`` (validation, compression, decomposition,
detection) plus ``result.refined.at_rank(r)`` consumed module by module (what the Lightning
callback and a Flower server do), against ``torch.linalg.svd`` of the compressed d x Kr
stacking of sampled modules, measured in the same process before and after the round and
scaled to all modules. 20% of the clients send random off-subspace updates. float32.

Times are CPU seconds of the process (``time.process_time``), not wall-clock: on a machine
shared with other jobs a process gets a varying share of the cores, and CPU time is what the
round costs. Run with ``OMP_NUM_THREADS=1`` so CPU time is the work of one thread; the step
timings in the comment line are CPU seconds too (``clair_aggregate``'s diagnostics).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from clair_speed import contaminated_federation

from clair_lightning import clair_aggregate
from clair_lightning.core.compression import compress_module
from clair_lightning.core.updates import validate_updates

CONTAMINATED = 0.2


def release_freed_memory() -> None:
    """Return memory freed while building the inputs to the OS (glibc): RSS counts live data."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def rss_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def svd_seconds(updates, names):
    validated = validate_updates(updates)
    seconds = []
    for name in names:
        stacked = compress_module(validated, name, validated.included).stacked.contiguous()
        start = time.process_time()
        torch.linalg.svd(stacked, full_matrices=False)
        seconds.append(time.process_time() - start)
    return seconds


def child(d: int, num_clients: int, rank: int, num_modules: int, svd_samples: int) -> dict:
    before_inputs = rss_mib()
    updates = contaminated_federation(num_clients, d, rank, CONTAMINATED, num_modules=num_modules)
    input_bytes = sum(b.nbytes + a.nbytes for u in updates for b, a in u.values())
    release_freed_memory()
    after_inputs = rss_mib()
    names = sorted(updates[0])
    sampled = names[:: max(1, len(names) // svd_samples)][:svd_samples]
    half = max(1, len(sampled) // 2)
    svd = svd_seconds(updates, sampled[:half])

    wall = time.perf_counter()
    start = time.process_time()
    result = clair_aggregate(updates)
    aggregate_seconds = time.process_time() - start
    start = time.process_time()
    for _module, _received in result.refined.at_rank(rank):
        pass  # a server would send each client its factors here; only one module is alive
    write_back_seconds = time.process_time() - start
    wall_seconds = time.perf_counter() - wall
    peak = peak_rss_mib()

    svd += svd_seconds(updates, sampled[half:])
    svd_module = statistics.median(svd)
    steps = result.diagnostics["cpu_seconds"]
    return {
        "d": d,
        "K": num_clients,
        "r": rank,
        "modules": num_modules,
        "threads": torch.get_num_threads(),
        "svd_per_module": svd_module,
        "svd_measured": len(svd),
        "aggregate": aggregate_seconds,
        "wall": wall_seconds,
        "write_back": write_back_seconds,
        "steps": steps,
        "flagged": sum(result.contaminated),
        "contaminated": round(CONTAMINATED * num_clients),
        "input_mib": input_bytes / 2**20,
        "rss_before_inputs_mib": before_inputs,
        "rss_after_inputs_mib": after_inputs,
        "peak_rss_mib": peak,
    }


def run_child(d, num_clients, rank, num_modules, svd_samples) -> dict:
    command = [sys.executable, __file__, "--child", *map(str, (d, num_clients, rank, num_modules))]
    command += ["--svd-samples", str(svd_samples)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


HEADER = (
    "| d | K | r | modules | round (CPU s) | of which write-back | 1 SVD (CPU s) | round / "
    "(modules x SVD) | peak above start / input | flagged |\n"
    "|---|---|---|---|---|---|---|---|---|---|"
)


def row(m: dict) -> str:
    total = m["aggregate"] + m["write_back"]
    svds = m["modules"] * m["svd_per_module"]
    extra = (m["peak_rss_mib"] - m["rss_before_inputs_mib"]) / m["input_mib"]
    return (
        f"| {m['d']} | {m['K']} | {m['r']} | {m['modules']} | {total:.1f} | "
        f"{m['write_back']:.1f} | {m['svd_per_module']:.2f} | **{total / svds:.2f}** | "
        f"{m['peak_rss_mib'] - m['rss_before_inputs_mib']:.0f} / {m['input_mib']:.0f} MiB "
        f"= **{extra:.2f}** | {m['flagged']} of {m['K']} ({m['contaminated']} contaminated) |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, a smoke check")
    parser.add_argument("--scaling", action="store_true", help="K and r sweeps (2 modules each)")
    parser.add_argument("--svd-samples", type=int, default=8)
    parser.add_argument("--child", nargs=4, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.svd_samples)))
        return
    if args.quick:
        configs = [(1024, 32, 8, 8)]
    elif args.scaling:
        configs = [(4096, k, 16, 2) for k in (16, 64, 256)] + [(4096, 64, r, 2) for r in (8, 64)]
    else:
        configs = [(4096, 64, 16, 64)]
    print(HEADER)
    for d, num_clients, rank, num_modules in configs:
        measured = run_child(d, num_clients, rank, num_modules, args.svd_samples)
        print(row(measured), flush=True)
        steps = ", ".join(f"{k} {v:.1f}" for k, v in measured["steps"].items())
        print(
            f"<!-- {measured['threads']} threads; round wall-clock {measured['wall']:.0f} s; SVD "
            f"measured on {measured['svd_measured']} "
            f"modules; clair_aggregate steps (CPU s): {steps}; RSS before inputs "
            f"{measured['rss_before_inputs_mib']:.0f} MiB, after "
            f"{measured['rss_after_inputs_mib']:.0f}, peak {measured['peak_rss_mib']:.0f} -->",
            flush=True,
        )


if __name__ == "__main__":
    main()
