"""Speed of one CLAIR aggregation, measured side by side with its reference costs.

    python benchmarks/clair_speed.py            # both comparisons, prints a table
    python benchmarks/clair_speed.py --no-naive # only the comparisons with one SVD
    python benchmarks/clair_speed.py --quick    # smaller sizes, for a smoke check
    python benchmarks/clair_speed.py --no-naive --modules 8  # one call over 8 modules

1. At d_out = d_in = 4096, r = 16, one module, float32, K = 64 and K = 16: one
   ``clair_aggregate`` call against one ``torch.linalg.svd`` of the compressed 4096 x Kr
   stacking (goals: ratio ≤ 0.3 at K = 64, ≤ 1.0 at K = 16), interleaved so both see the same
   machine load, with a pause between them (OpenMP workers keep spinning for a while after a
   large parallel call and would slow whatever runs next). Times are CPU seconds of the
   process (run with ``OMP_NUM_THREADS=1``: the work of one thread, whatever share of a
   shared machine the process gets), the step times too. Median and best of the
   repeats are reported.
2. At d = 1024, K = 16, r = 8: the naive dense block outlier pursuit (full SVD of the
   uncompressed 1024 x 16384 stacking in every iteration) against a whole ``clair_aggregate``
   call (goal: ≥ 30x).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from clair_lightning import clair_aggregate
from clair_lightning.core.compression import StackingCore, compress_module, stacking_core
from clair_lightning.core.decomposition import block_outlier_pursuit
from clair_lightning.core.synthetic import synthetic_federation
from clair_lightning.core.updates import validate_updates

PAUSE = 0.5


def contaminated_federation(num_clients, d, rank, fraction, seed=0, num_modules=1):
    """Benign updates in a shared subspace plus ``fraction`` random off-subspace clients."""
    generator = torch.Generator().manual_seed(seed)
    federation = synthetic_federation(
        num_clients,
        d_out=d,
        d_in=d,
        rank=rank,
        subspace_rank=rank,
        noise=0.05,
        num_modules=num_modules,
        generator=generator,
        dtype=torch.float32,
    )
    updates = [dict(u) for u in federation.updates]
    for k in range(round(fraction * num_clients)):
        for name, (b, a) in updates[k].items():
            random_b = torch.randn(b.shape, generator=generator)
            updates[k][name] = (random_b * (b.norm() / random_b.norm()), a)
    return updates


def timed(function, repeats):
    seconds = []
    for _ in range(repeats):
        start = time.process_time()
        result = function()
        seconds.append(time.process_time() - start)
    return seconds, result


def against_svd(d, num_clients, rank, repeats, num_modules=1):
    updates = contaminated_federation(num_clients, d, rank, 0.2, num_modules=num_modules)
    validated = validate_updates(updates)
    modules = [compress_module(validated, name, validated.included) for name in updates[0]]
    stackings = [module.stacked.contiguous() for module in modules]
    stacked = stackings[0]
    core = stacking_core(modules[0]).matrix
    clair_aggregate(updates)  # warm-up (allocator, thread pool)
    torch.linalg.svd(stacked, full_matrices=False)

    def every_svd():
        for stacking in stackings:
            torch.linalg.svd(stacking, full_matrices=False)

    svd_seconds, clair_seconds, materialise_seconds, steps = [], [], [], []
    for _ in range(repeats):
        time.sleep(PAUSE)
        svd_seconds += timed(every_svd, 1)[0]
        time.sleep(PAUSE)
        seconds, result = timed(lambda: clair_aggregate(updates), 1)
        clair_seconds += seconds
        steps.append(result.diagnostics["cpu_seconds"])
        materialise_seconds += timed(lambda r=result: list(r.refined.at_rank(rank)), 1)[0]
    core_svd = statistics.median(
        timed(lambda: torch.linalg.svd(core, full_matrices=False), repeats)[0]
    )
    svd, clair = statistics.median(svd_seconds), statistics.median(clair_seconds)
    materialise = statistics.median(materialise_seconds)
    median_run = clair_seconds.index(sorted(clair_seconds)[len(clair_seconds) // 2])
    step_text = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in steps[median_run].items())
    print(
        f"\n[1] d_out = d_in = {d}, K = {num_clients}, r = {rank}, float32, "
        f"{'one module' if num_modules == 1 else f'{num_modules} modules'}, "
        f"{torch.get_num_threads()} threads, {repeats} repeats"
    )
    each = "" if num_modules == 1 else f" (x {num_modules}, one per module)"
    print(
        f"    torch.linalg.svd of the {stacked.shape[0]} x {stacked.shape[1]} stacking{each}: "
        f"median {svd * 1e3:6.1f} CPU ms, best {min(svd_seconds) * 1e3:6.1f} CPU ms"
    )
    print(
        f"    clair_aggregate (one call):                median {clair * 1e3:6.1f} CPU ms, best "
        f"{min(clair_seconds) * 1e3:6.1f} CPU ms   ratio {clair / svd:.2f} "
        f"(best/best {min(clair_seconds) / min(svd_seconds):.2f})"
    )
    print(
        f"    one full SVD of the {core.shape[0]} x {core.shape[1]} core (median): "
        f"{core_svd * 1e3:6.1f} CPU ms = {core_svd * num_modules / svd:.2f} of one stacking's"
    )
    print(
        f"    + every client's refined update at rank {rank} (refined.at_rank): median "
        f"{materialise * 1e3:6.1f} CPU ms   ratio with it {(clair + materialise) / svd:.2f}"
    )
    print(
        f"    steps of the median call (CPU ms): {step_text}; "
        f"{result.diagnostics['iterations']} iterations; "
        f"flagged {sum(result.contaminated)} of {num_clients} "
        f"({round(0.2 * num_clients)} contaminated)"
    )
    return clair / svd


def naive_dense_pursuit(updates):
    """Block outlier pursuit on the uncompressed stacking, full SVD in every iteration."""
    products = [b @ a for b, a in (u["layers.0.proj"] for u in updates)]
    dense = torch.cat([p / p.norm() for p in products], dim=1)
    owner = torch.arange(len(updates)).repeat_interleave(products[0].shape[1])
    return block_outlier_pursuit(
        [StackingCore.from_matrix(dense)], [owner], len(updates), svd="full"
    )


def against_naive(d, num_clients, rank, repeats):
    updates = contaminated_federation(num_clients, d, rank, 0.25)
    clair_aggregate(updates)
    clair_seconds, result = timed(lambda: clair_aggregate(updates), repeats)
    naive_seconds, naive = timed(lambda: naive_dense_pursuit(updates), max(1, repeats // 3))
    clair, dense = statistics.median(clair_seconds), statistics.median(naive_seconds)
    print(f"\n[2] d = {d}, K = {num_clients}, r = {rank}, float32")
    print(
        f"    naive dense block outlier pursuit ({d} x {num_clients * d}, full SVD per "
        f"iteration, {naive.iterations} iterations): {dense * 1e3:9.1f} CPU ms"
    )
    print(
        f"    clair_aggregate (compress + decompose + detect + refine):  {clair * 1e3:9.1f} CPU ms"
        f"   speed-up {dense / clair:.0f}x  (goal >= 30x)"
    )
    agree = [bool(f) for f in naive.sparse_fraction > 0.5] == [bool(f) for f in result.contaminated]
    print(f"    same clients stand out (naive sparse share > 0.5 vs CLAIR flags): {agree}")
    return dense / clair


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-naive", action="store_true", help="skip the dense comparison")
    parser.add_argument("--modules", type=int, default=1, help="modules per client (default 1)")
    args = parser.parse_args()
    if args.modules < 1:
        parser.error(f"--modules must be at least 1, got {args.modules}")
    torch.manual_seed(0)
    if args.quick:
        against_svd(1024, 32, 8, 3)
        against_naive(256, 8, 4, 3)
    else:
        against_svd(4096, 64, 16, args.repeats, args.modules)
        against_svd(4096, 16, 16, args.repeats, args.modules)
        if not args.no_naive:
            against_naive(1024, 16, 8, args.repeats)


if __name__ == "__main__":
    main()
