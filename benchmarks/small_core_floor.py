"""What one small-K ``clair_aggregate`` call spends its time on: kernels against everything else.

    OMP_NUM_THREADS=1 python benchmarks/small_core_floor.py               # d = 4096, K = 16, r = 16
    OMP_NUM_THREADS=1 python benchmarks/small_core_floor.py --clients 64  # K = 64 (5 repeats ok)

At d_out = d_in = 4096, K = 16, r = 16 (float32, one module, the shape of `clair_speed.py`'s
K = 16 row), in one run:

1. one ``torch.linalg.svd`` of the compressed 4096 x 256 stacking and one ``clair_aggregate``
   call, interleaved with pauses as in ``clair_speed.py`` (CPU seconds, medians);
2. every ATen operation of one call, recorded with a copy of its arguments
   (``TorchDispatchMode``), then replayed one by one, each in a warm loop; the BLAS/LAPACK ones
   (GEMMs, QR, eigh, Cholesky, triangular solves, SVD) are listed by kind, with the two Gram
   matrices the call forms in numpy (``symmetric_gram`` of the 256 x 4096 stackings). The
   kernels' sum is the call's kernel floor: what it would cost if nothing but its dense linear
   algebra ran, with warm caches; the sum over every operation is what it would cost with
   nothing between the operations;
3. the rest of the call (call − floor), per ATen operation, next to the cost of one trivial
   operation (a 25-element ``mul``) measured here, and the call minus every operation: the
   Python between them and their running on colder caches than in the replay.

The floor is a lower bound for any implementation of the same steps (compiled or not).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from clair_lightning import clair_aggregate
from clair_lightning.core.compression import compress_module, symmetric_gram
from clair_lightning.core.updates import validate_updates

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clair_speed import contaminated_federation, timed  # noqa: E402

PAUSE = 0.5
_KERNELS = {
    "mm",
    "bmm",
    "addmm",
    "addmm_",
    "baddbmm",
    "_linalg_eigh",
    "linalg_qr",
    "linalg_cholesky_ex",
    "_linalg_svd",
    "linalg_solve_triangular",
}


class _Recorder(TorchDispatchMode):
    """Keeps every ATen operation with a copy of its arguments, and which ones are kernels."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.operations: list[tuple[object, tuple, dict]] = []
        self.kernels: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.count += 1
        name = func.overloadpacket.__name__
        copied = tuple(_copied(a) for a in args)
        copied_kwargs = {k: _copied(v) for k, v in kwargs.items()}
        self.operations.append((func, copied, copied_kwargs))
        if name in _KERNELS:
            self.kernels.add(len(self.operations) - 1)
        return func(*args, **kwargs)


def _copied(value):
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def _warm_cpu_seconds(function, repeats: int) -> float:
    """Mean CPU seconds of ``function`` over ``repeats`` calls after one warm-up call."""
    function()
    return statistics.mean(timed(function, repeats)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if min(args.clients, args.rank, args.d, args.repeats) < 1:
        parser.error("--clients, --rank, --d and --repeats must be positive")
    torch.manual_seed(0)
    updates = contaminated_federation(args.clients, args.d, args.rank, 0.2)
    validated = validate_updates(updates)
    module = compress_module(validated, "layers.0.proj", validated.included)
    stacked = module.stacked.contiguous()
    clair_aggregate(updates)
    torch.linalg.svd(stacked, full_matrices=False)
    svd_seconds, call_seconds = [], []
    for _ in range(args.repeats):
        time.sleep(PAUSE)
        svd_seconds += timed(lambda: torch.linalg.svd(stacked, full_matrices=False), 1)[0]
        time.sleep(PAUSE)
        call_seconds += timed(lambda: clair_aggregate(updates), 1)[0]
    svd, call = statistics.median(svd_seconds), statistics.median(call_seconds)

    recorder = _Recorder()
    with recorder:
        clair_aggregate(updates)
    by_kind: dict[str, list[float]] = {}
    replayed = []
    for index, (func, op_args, op_kwargs) in enumerate(recorder.operations):
        seconds = _warm_cpu_seconds(lambda f=func, a=op_args, k=op_kwargs: f(*a, **k), 20)
        replayed.append(seconds)
        if index in recorder.kernels:
            by_kind.setdefault(func.overloadpacket.__name__, []).append(seconds)
    rows = torch.randn(stacked.shape[1], args.d)
    gram = _warm_cpu_seconds(lambda: symmetric_gram(rows), 10)
    kernels = sum(sum(times) for times in by_kind.values()) + 2 * gram
    operations = sum(replayed) + 2 * gram
    trivial = torch.randn(25)
    trivial_op = _warm_cpu_seconds(lambda: torch.mul(trivial, 2.0), 2000)
    rest = call - kernels

    print(
        f"d_out = d_in = {args.d}, K = {args.clients}, r = {args.rank}, float32, one module, "
        f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats"
    )
    print(
        f"  torch.linalg.svd of the {stacked.shape[0]} x {stacked.shape[1]} stacking: "
        f"median {svd * 1e3:6.1f} CPU ms"
    )
    print(
        f"  clair_aggregate (one call):              median {call * 1e3:6.1f} CPU ms   "
        f"ratio {call / svd:.2f}"
    )
    print(f"  ATen operations in one call: {recorder.count}")
    for name, times in sorted(by_kind.items(), key=lambda item: -sum(item[1])):
        print(f"    {name:24s} {len(times):4d} calls  {sum(times) * 1e3:6.2f} CPU ms replayed")
    print(f"    {'numpy syrk Grams':24s} {2:4d} calls  {2 * gram * 1e3:6.2f} CPU ms")
    print(
        f"  kernel floor (the above, warm): {kernels * 1e3:6.1f} CPU ms = {kernels / svd:.2f} "
        "of one SVD"
    )
    print(
        f"  every ATen operation replayed alone, warm: {operations * 1e3:6.1f} CPU ms = "
        f"{operations / svd:.2f} of one SVD (the other operations: "
        f"{(operations - kernels) * 1e3:.1f} ms); the Python between them: "
        f"{(call - operations) * 1e3:.1f} ms"
    )
    print(
        f"  the rest of the call: {rest * 1e3:6.1f} CPU ms = {rest / svd:.2f} of one SVD, "
        f"{rest / recorder.count * 1e6:.1f} µs per ATen operation "
        f"(one 25-element mul: {trivial_op * 1e6:.1f} µs)"
    )


if __name__ == "__main__":
    main()
