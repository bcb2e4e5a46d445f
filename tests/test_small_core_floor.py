"""benchmarks/small_core_floor.py: every operation of a real call recorded, and replayable."""

import importlib.util
import sys
from pathlib import Path

import torch

from clair_lightning import clair_aggregate

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "small_core_floor.py"
spec = importlib.util.spec_from_file_location("small_core_floor", SCRIPT)
small_core_floor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(small_core_floor)
contaminated_federation = sys.modules["clair_speed"].contaminated_federation


def test_the_recorder_keeps_every_operation_and_its_kernels_replay():
    """Recording leaves the call's result as it is; the recorder sees the call's kernels (a
    GEMM, an eigh, a Cholesky) among all its operations, and a recorded GEMM replayed on its
    copied arguments gives their product (what the benchmark times)."""
    updates = contaminated_federation(6, 64, 4, 0.2)
    recorder = small_core_floor._Recorder()
    with recorder:
        result = clair_aggregate(updates)
    assert result.contaminated == clair_aggregate(updates).contaminated
    kinds = {recorder.operations[i][0].overloadpacket.__name__ for i in recorder.kernels}
    assert {"mm", "_linalg_eigh", "linalg_cholesky_ex"} <= kinds
    assert recorder.count == len(recorder.operations) > len(recorder.kernels) > 0
    first_gemm = next(
        i
        for i in sorted(recorder.kernels)
        if recorder.operations[i][0].overloadpacket.__name__ == "mm"
    )
    func, args, kwargs = recorder.operations[first_gemm]
    expected = args[0] @ args[1]
    torch.testing.assert_close(func(*args, **kwargs), expected, rtol=0, atol=0)
