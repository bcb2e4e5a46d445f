"""Why the ALM's penalty grows by 1.5 per iteration: fewer iterations cost accuracy.

    OMP_NUM_THREADS=1 python benchmarks/alm_penalty_growth.py

At the K = 16 shape of ``clair_speed.py`` (d = 4096, r = 16, float32, 20% off-subspace
clients), one ``clair_aggregate`` call per growth factor, interleaved (CPU ms, medians), and
on five synthetic federations the distance of ``block_outlier_pursuit``'s result from the
converged solution of the same problem (growth 1.1, tolerance 1e-10, a full SVD in every
thresholding): ``‖L − L*‖_F / ‖M‖_F``, the largest change of a client's sparse fraction, and
the low-rank part's rank.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

import torch

import clair_lightning.core.clair as clair_module
from clair_lightning import clair_aggregate
from clair_lightning.core.compression import compress_module, stacking_core
from clair_lightning.core.decomposition import block_outlier_pursuit
from clair_lightning.core.updates import validate_updates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clair_speed import contaminated_federation  # noqa: E402

GROWTHS = (1.5, 2.0, 2.5, 3.0)
FEDERATIONS = [(16, 4096, 16, 0.2), (16, 512, 8, 0.2), (20, 256, 8, 0.3), (10, 256, 8, 0.0)]


def timing(repeats: int = 15) -> None:
    updates = contaminated_federation(16, 4096, 16, 0.2)
    validated = validate_updates(updates)
    stacked = compress_module(validated, validated.module_names[0], validated.included).stacked
    stacked = stacked.contiguous()
    svd = []
    total = {g: [] for g in GROWTHS}
    decompose = {g: [] for g in GROWTHS}
    iterations = {}
    try:
        for _ in range(repeats + 1):
            start = time.process_time()
            torch.linalg.svd(stacked, full_matrices=False)
            svd.append(time.process_time() - start)
            for growth in GROWTHS:
                # The growth is the solver's constant, not an option of clair_aggregate.
                clair_module.block_outlier_pursuit = functools.partial(
                    block_outlier_pursuit, penalty_growth=growth
                )
                start = time.process_time()
                result = clair_aggregate(updates)
                total[growth].append(time.process_time() - start)
                decompose[growth].append(result.diagnostics["cpu_seconds"]["decompose"])
                iterations[growth] = result.diagnostics["iterations"]
    finally:
        clair_module.block_outlier_pursuit = block_outlier_pursuit
    one_svd = 1000 * statistics.median(svd[1:])
    print(f"d = 4096, K = 16, r = 16: one SVD of the 4096 x 256 stacking {one_svd:.1f} CPU ms")
    print("growth, iterations, call (CPU ms and x one SVD), decomposition (CPU ms)")
    for growth in GROWTHS:
        call = 1000 * statistics.median(total[growth][1:])
        part = 1000 * statistics.median(decompose[growth][1:])
        print(
            f"  {growth}: {iterations[growth]:3d} iterations, call {call:.1f} "
            f"({call / one_svd:.2f}), decompose {part:.1f}"
        )


def accuracy() -> None:
    print("distance from the converged solution: growth: iterations, ‖L − L*‖/‖M‖, sparse, rank")
    for seed, (clients, d, rank, fraction) in enumerate(FEDERATIONS):
        validated = validate_updates(contaminated_federation(clients, d, rank, fraction, seed))
        modules = [
            compress_module(validated, name, validated.included) for name in validated.module_names
        ]
        cores = [stacking_core(module) for module in modules]
        owners = [module.block_owner for module in modules]
        args = (cores, owners, len(validated.included))
        exact = block_outlier_pursuit(
            *args, tolerance=1e-10, penalty_growth=1.1, max_iterations=5000, svd="full"
        )
        scale = sum(float(core.matrix.double().square().sum()) for core in cores) ** 0.5
        cells = []
        for growth in GROWTHS[:3]:
            result = block_outlier_pursuit(
                *args, penalty_growth=growth, generator=torch.Generator().manual_seed(0)
            )
            distance = sum(
                float((a.double() - b.double()).square().sum())
                for a, b in zip(result.low_rank, exact.low_rank, strict=True)
            )
            sparse = (result.sparse_fraction.double() - exact.sparse_fraction.double()).abs()
            cells.append(
                f"{growth}: {result.iterations}, {distance**0.5 / scale:.1e}, "
                f"{float(sparse.max()):.1e}, {result.low_rank_ranks[0]}"
            )
        print(f"  K = {clients}, d = {d}, {fraction:.0%}: " + "; ".join(cells), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"threads {torch.get_num_threads()}")
    timing()
    accuracy()
