"""Exact coordinate-wise median at LLM scale against one SVD, measured in one run.

    python benchmarks/median_speed.py            # d = 4096, K = 64, r = 16, one module
    python benchmarks/median_speed.py --quick    # d = 1024, K = 32, r = 8

One ``median`` call (products of all clients formed one block of rows at a time by one batched
product, middle values by selection) against one ``torch.linalg.svd`` of the compressed d x Kr
stacking (goal: ≤ 10x), and, on the first row blocks, against the previous implementation
(client-by-client products, full sort along the clients): same values asserted bit for bit.
Memory is bounded by the block (``chunk_elements``), reported with the figures. Times are CPU
seconds of the process (run with ``OMP_NUM_THREADS=1``): on a shared machine the wall-clock
share of the cores varies during a run.
"""

from __future__ import annotations

import argparse
import time

import torch
from clair_speed import contaminated_federation

from clair_lightning.core.baselines import median
from clair_lightning.core.compression import compress_module
from clair_lightning.core.dense import DEFAULT_CHUNK_ELEMENTS
from clair_lightning.core.updates import validate_updates


def previous_median_rows(factors, rows: slice) -> torch.Tensor:
    """The previous implementation on some rows: client-by-client products, a full sort."""
    products = torch.stack([b[rows] @ a for b, a in factors])
    ordered = products.sort(dim=0).values
    count = products.shape[0]
    return (ordered[(count - 1) // 2] + ordered[count // 2]) / 2


def seconds(function) -> float:
    start = time.process_time()
    function()
    return time.process_time() - start


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
    start = time.process_time()
    result = median(updates)
    total = time.process_time() - start
    svd_after = seconds(lambda: torch.linalg.svd(stacked, full_matrices=False))
    svd = min(svd, svd_after)

    factors = [validated.updates[k][name] for k in validated.included]
    block_rows = DEFAULT_CHUNK_ELEMENTS // (num_clients * d)
    compared = slice(0, min(d, args.compared_blocks * block_rows))
    start = time.process_time()
    expected = torch.cat(
        [
            previous_median_rows(factors, slice(row, row + block_rows))
            for row in range(0, compared.stop, block_rows)
        ]
    )
    previous = time.process_time() - start
    assert torch.equal(result.refined[0][name][0][compared], expected), "values differ"
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
    share = compared.stop / d
    print(
        f"  previous implementation on the first {compared.stop} rows: {previous:6.2f} s, "
        f"{previous / share:7.1f} s scaled to the module ({previous / share / total:.1f}x slower); "
        "identical values"
    )


if __name__ == "__main__":
    main()
