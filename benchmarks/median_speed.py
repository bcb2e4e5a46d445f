"""Exact coordinate-wise median at LLM scale against one SVD, measured in one run.

    python benchmarks/median_speed.py            # d = 4096, K = 64, r = 16, one module
    python benchmarks/median_speed.py --quick    # d = 1024, K = 32, r = 8

One ``median`` call (products formed a block of rows at a time, middle values by selection)
against one ``torch.linalg.svd`` of the compressed d x Kr stacking (goal: ≤ 10x), and, on the
same first row blocks, against the previous sort-along-clients implementation (same values
asserted, bit for bit). Peak memory of the median block (``chunk_elements``) is bounded by
construction; the script reports the block size.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from clair_speed import contaminated_federation

from clair_lightning.core.baselines import _middle_value, median
from clair_lightning.core.compression import compress_module
from clair_lightning.core.dense import DEFAULT_CHUNK_ELEMENTS, product_row_blocks
from clair_lightning.core.updates import validate_updates


def sorted_middle(products: torch.Tensor) -> torch.Tensor:
    """The previous implementation: a full sort along the clients."""
    ordered = products.sort(dim=0).values
    count = products.shape[0]
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


def seconds(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="d = 1024, K = 32, r = 8")
    parser.add_argument("--compared-blocks", type=int, default=4)
    args = parser.parse_args()
    d, num_clients, rank = (1024, 32, 8) if args.quick else (4096, 64, 16)
    updates = contaminated_federation(num_clients, d, rank, 0.2)
    validated = validate_updates(updates)
    name = validated.module_names[0]
    stacked = compress_module(validated, name, validated.included).stacked.contiguous()
    torch.linalg.svd(stacked, full_matrices=False)  # warm-up
    svd = seconds(lambda: torch.linalg.svd(stacked, full_matrices=False))
    total = seconds(lambda: median(updates))
    svd_after = seconds(lambda: torch.linalg.svd(stacked, full_matrices=False))
    svd = min(svd, svd_after)

    factors = [validated.updates[k][name] for k in validated.included]
    blocks = itertools.islice(product_row_blocks(factors), args.compared_blocks)
    old = new = 0.0
    rows_compared = 0
    for rows, products in blocks:
        start = time.perf_counter()
        expected = sorted_middle(products)
        old += time.perf_counter() - start
        start = time.perf_counter()
        got = _middle_value(products)
        new += time.perf_counter() - start
        assert torch.equal(got, expected), "selection and sort disagree"
        rows_compared += rows.stop - rows.start
    block_rows = DEFAULT_CHUNK_ELEMENTS // (num_clients * d)
    print(
        f"d_out = d_in = {d}, K = {num_clients}, r = {rank}, float32, one module, "
        f"{torch.get_num_threads()} threads; blocks of {block_rows} rows "
        f"({DEFAULT_CHUNK_ELEMENTS * 4 / 2**20:.0f} MiB of products)"
    )
    print(f"  torch.linalg.svd of the {d} x {stacked.shape[1]} stacking: {svd:7.2f} s")
    print(
        f"  median (whole module, exact):             {total:7.2f} s   ratio {total / svd:5.1f}"
        "  (goal <= 10)"
    )
    print(
        f"  middle values on the first {rows_compared} rows: selection {new:6.2f} s, previous "
        f"sort {old:6.2f} s ({old / new:.1f}x), identical values"
    )


if __name__ == "__main__":
    main()
