"""Run a comparison grid: resumable, one process at a time or in a pool, with progress lines."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from ..jsonio import write_json
from .backends import Backend, backend_for, check_aggregators
from .grid import Cell, expand_grid


def run_comparison(
    config: Path,
    aggregators: Sequence[str],
    contaminations: Sequence[str],
    seeds: Sequence[int],
    output: Path,
    *,
    workers: int = 1,
    engine: str = "lightning",
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run every cell not yet finished under ``output/cells`` and return all cell records.

    Everything is validated before the first cell runs. A cell's record is written atomically
    when it finishes, so an interrupted comparison resumes where it stopped.
    """
    config = Path(config)
    backend = backend_for(config, engine)
    check_aggregators(list(aggregators))
    known = backend.contaminations()
    unknown = [name for name in contaminations if name not in known]
    if unknown:
        raise ValueError(
            f"unknown contamination(s) {unknown} for recipe {backend.recipe!r}; "
            f"known: {', '.join(known)}"
        )
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    cells = expand_grid(backend.recipe, aggregators, contaminations, seeds)
    cells_dir = Path(output) / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)

    records: dict[str, dict] = {}
    pending: list[Cell] = []
    for cell in cells:
        saved = _load(cells_dir / f"{cell.key}.json")
        if saved is not None:
            records[cell.key] = saved
        else:
            pending.append(cell)
    if records:
        progress(f"resuming: {len(records)} of {len(cells)} cells already finished")

    started = time.perf_counter()
    done = 0

    def finished(cell: Cell, result: dict) -> None:
        nonlocal done
        done += 1
        write_json(cells_dir / f"{cell.key}.json", result)
        records[cell.key] = result
        elapsed = time.perf_counter() - started
        remaining = elapsed / done * (len(pending) - done)
        progress(
            f"[{len(records)}/{len(cells)}] {cell.aggregator} x {cell.contamination} x seed "
            f"{cell.seed}: {result['runtime_seconds']:.1f} s (eta {remaining:.0f} s)"
        )

    if workers == 1 or len(pending) <= 1:
        for cell in pending:
            finished(cell, backend.run(cell, Path(output) / "runs" / cell.key))
    else:
        pool = ProcessPoolExecutor(
            workers,
            mp_context=get_context("spawn"),
            initializer=_exit_with_parent,
            initargs=(os.getpid(),),
        )
        try:
            futures = {
                pool.submit(_run_cell, config, engine, cell, Path(output) / "runs" / cell.key): cell
                for cell in pending
            }
            for future in as_completed(futures):
                finished(futures[future], future.result())
        except BaseException:
            _stop_workers(pool)
            raise
        pool.shutdown()
    return {
        "config": str(config),
        "recipe": backend.recipe,
        "task": {"metric": backend.task_metric, "higher_is_better": backend.higher_is_better},
        "grid": {
            "aggregators": list(aggregators),
            "contaminations": list(contaminations),
            "seeds": list(seeds),
        },
        "cells": [records[cell.key] for cell in cells],
    }


def _run_cell(config: Path, engine: str, cell: Cell, workdir: Path) -> dict:
    """Pool entry point: rebuild the backend in the worker process."""
    backend: Backend = backend_for(config, engine)
    return backend.run(cell, workdir)


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: a worker whose comparison process is gone (SIGKILL included) stops
    within a second instead of computing cells nobody will record."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """On an interruption, end the running cells now: their records are not written, so a
    rerun of the same command runs them again."""
    processes = list((pool._processes or {}).values())  # no public handle on the workers
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(timeout=10)


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
