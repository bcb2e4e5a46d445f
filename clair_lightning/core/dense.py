"""Dense client products a block of output rows at a time, for coordinate-wise rules.

Coordinate-wise statistics (median, trimmed mean, "a little is enough") have no Gram shortcut:
they need every entry of every ``B_k A_k``. Forming all K products at once costs
``K·d_out·d_in`` floats; going over output rows in blocks caps that at ``chunk_elements``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .updates import LoraFactors

# 2**24 products in the working block: 64 MiB in float32 (the coordinate-wise rules sort a
# slice of it at a time in a buffer of their own, 1 MiB).
DEFAULT_CHUNK_ELEMENTS = 2**24
# Each client's block is followed by one cache line of padding: with a power-of-two stride
# between clients, the K values of one coordinate share a cache set, and reading them across
# clients was 3x slower (measured at K = 64, d_in = 4096).
CLIENT_PADDING_ELEMENTS = 16


def product_row_blocks(
    factors: Sequence[LoraFactors], chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> Iterator[tuple[slice, Tensor]]:
    """Yield ``(rows, products)`` with ``products[k] = (B_k A_k)[rows]`` (``K x |rows| x d_in``).

    A block holds at most ``chunk_elements`` entries (and at least one full output row). The
    yielded tensor is scratch space: the next block overwrites it, and callers may modify it.
    It is a strided view (clients are ``CLIENT_PADDING_ELEMENTS`` apart beyond their rows).
    """
    if not factors:
        raise ValueError("product_row_blocks needs at least one client")
    if chunk_elements < 1:
        raise ValueError(f"chunk_elements must be at least 1, got {chunk_elements}")
    d_out, d_in = factors[0][0].shape[0], factors[0][1].shape[1]
    rows_per_block = max(1, chunk_elements // (len(factors) * d_in))
    first_b = factors[0][0]
    block_rows = min(rows_per_block, d_out)
    storage = torch.empty(
        len(factors),
        block_rows * d_in + CLIENT_PADDING_ELEMENTS,
        dtype=first_b.dtype,
        device=first_b.device,
    )
    scratch = storage[:, : block_rows * d_in].view(len(factors), block_rows, d_in)
    # One batched product per block when the ranks agree: K separate small products cost a
    # thread-pool round trip each, 10x the arithmetic on a busy 2-core machine (measured).
    same_rank = len({b.shape[1] for b, _ in factors}) == 1
    stacked_b = torch.stack([b for b, _ in factors]) if same_rank else None
    stacked_a = torch.stack([a for _, a in factors]) if same_rank else None
    for start in range(0, d_out, rows_per_block):
        rows = slice(start, min(start + rows_per_block, d_out))
        block = scratch[:, : rows.stop - rows.start]
        if stacked_b is not None:
            torch.bmm(stacked_b[:, rows], stacked_a, out=block)
        else:
            for k, (b, a) in enumerate(factors):
                torch.matmul(b[rows], a, out=block[k])
        yield rows, block
