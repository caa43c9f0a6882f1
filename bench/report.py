"""What the benchmark scripts share: interleaved timing, the command line they ran, the JSON they save."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """The exact command, for RESULTS.md: `python bench/<script> ARGS` (argv None: this process's arguments)."""
    return " ".join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def save_json(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def interleaved(calls: dict, iters: int, warmup: int = 0) -> dict[str, list[float]]:
    """Seconds of every call of each named function, the functions alternating so machine noise hits all alike."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in calls}
    for _ in range(iters):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return samples
