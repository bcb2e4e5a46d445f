"""What the collusion and support checks add to one ``clair_aggregate`` call, as one-run ratios.

    python benchmarks/detection_overhead.py            # d = 4096, K = 64, r = 16 (goal ≤ 1.2)
    python benchmarks/detection_overhead.py --quick    # d = 1024, K = 32, r = 8

Calls with every check and with ``collusion`` and ``support`` left out are interleaved (same
machine load), on a federation without attackers and on one where 20% of the clients send one
identical message (the benign mean), so the leave-group-out re-estimation runs. The ratio is
of CPU seconds (the process's, one thread): on a shared machine the wall clock also counts the
time the call waits for a core, which other jobs decide (it is printed too). Also the share of
each full call spent in the two checks (its ``collusion_groups`` and ``collusion_support``
steps, from the call's own timings), and the ratio of the call plus every client's write-back
at rank r (the write-back reuses the collusion check's row-basis Gram). Medians of the repeats.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clair_lightning import clair_aggregate
from clair_lightning.core.attacks import contaminate
from clair_lightning.core.synthetic import synthetic_federation

WITHOUT_NEW_CHECKS = ("off_subspace", "direction", "norm")


def federation(num_clients, d, rank, colluding_fraction):
    updates = synthetic_federation(
        num_clients,
        d_out=d,
        d_in=d,
        rank=rank,
        subspace_rank=rank,
        noise=0.05,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float32,
    ).updates
    colluders = [k < round(colluding_fraction * num_clients) for k in range(num_clients)]
    return contaminate(updates, colluders, "inner_product_manipulation", epsilon=-1.0)


def new_steps(laps):
    return laps.get("collusion_groups", 0.0) + laps.get("collusion_support", 0.0)


def timed(updates, rank, **options):
    """CPU and wall seconds of the call, the checks' share of it, and CPU seconds of the call
    plus the write-back.

    The write-back reuses the collusion check's row-basis Gram; without the check it forms
    that Gram itself, so the round (call + write-back) is where the checks' net cost shows.
    """
    start, start_cpu = time.perf_counter(), time.process_time()
    result = clair_aggregate(updates, **options)
    call, call_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    list(result.refined.at_rank(rank))
    laps = result.diagnostics["cpu_seconds"]
    return call_cpu, call, new_steps(laps) / sum(laps.values()), time.process_time() - start_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    d, num_clients, rank = (1024, 32, 8) if args.quick else (4096, 64, 16)
    print(
        f"d_out = d_in = {d}, K = {num_clients}, r = {rank}, float32, "
        f"{torch.get_num_threads()} threads, {args.repeats} repeats"
    )
    for fraction in (0.0, 0.2):
        updates = federation(num_clients, d, rank, fraction)
        clair_aggregate(updates)  # warm-up
        runs = {"full": [], "reduced": []}
        for _ in range(args.repeats):
            runs["reduced"].append(timed(updates, rank, checks=WITHOUT_NEW_CHECKS))
            time.sleep(0.3)
            runs["full"].append(timed(updates, rank))
            time.sleep(0.3)
        full, reduced = (
            [statistics.median(column) for column in zip(*runs[name], strict=True)]
            for name in ("full", "reduced")
        )
        print(
            f"{fraction:.0%} identical colluders: all checks {full[0] * 1000:.0f} CPU ms, "
            f"without them {reduced[0] * 1000:.0f}: ratio {full[0] / reduced[0]:.2f} "
            f"(goal ≤ 1.20; wall-clock {full[1] * 1000:.0f} against {reduced[1] * 1000:.0f} ms, "
            f"{full[1] / reduced[1]:.2f}); share of a call in the two checks {full[2]:.1%}; "
            f"with every client's rank-{rank} write-back {full[3] * 1000:.0f} against "
            f"{reduced[3] * 1000:.0f} CPU ms: ratio {full[3] / reduced[3]:.2f}"
        )


if __name__ == "__main__":
    main()
