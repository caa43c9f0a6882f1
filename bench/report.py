"""What the benchmark scripts share: the command line they ran; interleaved timing and JSON writing come from
the engine's own benchmark package (engine/bench), so the scripts and `python -m engine bench` time alike."""

from __future__ import annotations

import sys

from engine.bench.report import save_json, table_cell  # noqa: F401  (re-exported for the scripts)
from engine.bench.timing import interleaved  # noqa: F401


def command_line(script: str, argv: list[str] | None) -> str:
    """The exact command, for RESULTS.md: `python bench/<script> ARGS` (argv None: this process's arguments)."""
    return " ".join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])
