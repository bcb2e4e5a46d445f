"""Exact coordinate-wise median at LLM scale against one SVD, measured in one run.

    python benchmarks/median_speed.py            # d = 4096, K = 64, r = 16, one module
    python benchmarks/median_speed.py --quick    # d = 1024, K = 32, r = 8

One ``median`` call (products of all clients formed one block of rows at a time by one batched
product; per slice of coordinates, the clients' values transposed to contiguous rows and sorted
there) against one ``torch.linalg.svd`` of the compressed d x Kr stacking (goal: ≤ 10x), and,
on the first row blocks, against two earlier implementations, asserting the same values bit for
bit: the straightforward definition (client-by-client products, ``torch.sort`` along the
clients) and the previous release's (``numpy.partition`` at the two middle ranks along the
clients). Memory is bounded by the block (``chunk_elements``), reported with the figures. Times
are CPU seconds of the process (run with ``OMP_NUM_THREADS=1``): on a shared machine the
wall-clock share of the cores varies during a run.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from clair_speed import contaminated_federation

from clair_lightning.core.baselines import median
from clair_lightning.core.compression import compress_module
from clair_lightning.core.dense import DEFAULT_CHUNK_ELEMENTS
from clair_lightning.core.updates import validate_updates


def straightforward_median_rows(factors, rows: slice) -> torch.Tensor:
    """The definition on some rows: client-by-client products, a full sort along the clients."""
    products = torch.stack([b[rows] @ a for b, a in factors])
    ordered = products.sort(dim=0).values
    count = products.shape[0]
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


def partition_median_rows(factors, rows: slice) -> torch.Tensor:
    """The previous release on some rows: ``numpy.partition`` at both middle ranks, axis 0."""
    products = torch.bmm(
        torch.stack([b[rows] for b, _ in factors]), torch.stack([a for _, a in factors])
    )
    count = products.shape[0]
    lower, upper = (count - 1) // 2, count // 2
    middle = np.partition(products.numpy(), [lower, upper], axis=0)
    return (torch.from_numpy(middle[lower]) + torch.from_numpy(middle[upper])) / 2


def seconds(function) -> float:
    start = time.process_time()
    function()
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 1024, K = 32, r = 8")
    parser.add_argument("--compared-blocks", type=int, default=2)
    args = parser.parse_args()
    d, num_clients, rank = (1024, 32, 8) if args.quick else (4096, 64, 16)
    updates = contaminated_federation(num_clients, d, rank, 0.2)
    validated = validate_updates(updates)
    name = validated.module_names[0]
    stacked = compress_module(validated, name, validated.included).stacked.contiguous()
    torch.linalg.svd(stacked, full_matrices=False)  # warm-up
    svd = seconds(lambda: torch.linalg.svd(stacked, full_matrices=False))
    start = time.process_time()
    result = median(updates)
    total = time.process_time() - start
    svd_after = seconds(lambda: torch.linalg.svd(stacked, full_matrices=False))
    svd = min(svd, svd_after)

    factors = [validated.updates[k][name] for k in validated.included]
    block_rows = DEFAULT_CHUNK_ELEMENTS // (num_clients * d)
    compared = min(d, args.compared_blocks * block_rows)
    computed = result.refined[0][name][0][:compared]
    references = {}
    for label, reference in (
        ("straightforward definition (torch.sort)", straightforward_median_rows),
        ("previous release (numpy.partition)", partition_median_rows),
    ):
        start = time.process_time()
        expected = torch.cat(
            [
                reference(factors, slice(row, row + block_rows))
                for row in range(0, compared, block_rows)
            ]
        )
        references[label] = time.process_time() - start
        same_bits = torch.equal(computed.view(torch.int32), expected.view(torch.int32))
        assert same_bits, f"values differ from the {label}"
    print(
        f"d_out = d_in = {d}, K = {num_clients}, r = {rank}, float32, one module, "
        f"{torch.get_num_threads()} threads; blocks of {block_rows} rows "
        f"({DEFAULT_CHUNK_ELEMENTS * 4 / 2**20:.0f} MiB of products)"
    )
    print(f"  torch.linalg.svd of the {d} x {stacked.shape[1]} stacking: {svd:7.2f} CPU s")
    print(
        f"  median (whole module, exact):             {total:7.2f} CPU s   ratio {total / svd:5.1f}"
        "  (goal <= 10)"
    )
    share = compared / d
    for label, elapsed in references.items():
        print(
            f"  {label} on the first {compared} rows: {elapsed:6.2f} CPU s, "
            f"{elapsed / share:7.1f} s scaled to the module ({elapsed / share / total:.1f}x "
            "slower); identical values"
        )


if __name__ == "__main__":
    main()
