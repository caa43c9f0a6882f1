"""What every benchmark script does with its results: the command line it ran and the JSON it saves."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def command_line(script: str, argv: list[str] | None) -> str:
    """The exact command, for RESULTS.md: `python bench/<script> ARGS` (argv None: this process's arguments)."""
    return " ".join(["python", f"bench/{script}", *(sys.argv[1:] if argv is None else argv)])


def save_json(report: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
