"""The report's frame (device, versions, command) and its readable table; JSON writing."""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

import torch

from engine.version import __version__


def command_line(argv: list[str] | None, script: str | None = None) -> str:
    """The exact command, for RESULTS.md: `python -m engine ARGS`, or `python bench/SCRIPT ARGS` for a script
    of bench/ (argv None: this process's arguments)."""
    program = ["python", f"bench/{script}"] if script else ["python", "-m", "engine"]
    return shlex.join([*program, *(sys.argv[1:] if argv is None else argv)])


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch thread{'' if threads == 1 else 's'}"
    return {
        "device": {"type": device.type, "name": name},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "diffusers": _version("diffusers"), "transformers": _version("transformers"),
                     "triton": _version("triton"), "engine": __version__},
    }


def save_json(report: dict, path: Path | None) -> None:
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")


def table_cell(value, fmt: str) -> str:
    """A Markdown table cell: the value formatted, or '-' where there is none."""
    return "-" if value is None else format(value, fmt)


COLUMNS = ("component", "variant", "p50 ms", "p90 ms", "p99 ms", "img/s", "peak MiB", "floor ms", "% roofline",
           "ours vs it")


def table(report: dict) -> str:
    """A markdown table (readable on a terminal, pasteable into RESULTS.md) and the lines that frame it."""
    peaks = ", ".join(f"{dtype} {tflops:.3g}" for dtype, tflops in report["matmul_peak_tflops"].items())
    lines = [f"{report['device']['name']} | torch {report['versions']['torch']} | {report['date']}",
             f"matmul peak (TFLOP/s, measured in this run): {peaks}; floor = FLOPs / peak; "
             f"% roofline = floor / p50",
             f"peak memory: {report['peak_memory']}; timer: {report['timer']}",
             "",
             "| " + " | ".join(COLUMNS) + " |",
             "|" + "---|" * 2 + "---:|" * (len(COLUMNS) - 2)]
    for row in report["rows"]:
        speedup = row["ours_speedup"]
        ratio = "-" if speedup is None or row["variant"] == "ours" else f"{speedup:.2f}x"
        flag = "" if row["finite"] is not False else " (NaN/inf!)"
        cells = [table_cell(row[name], fmt) for name, fmt in (
            ("p50_ms", ".2f"), ("p90_ms", ".2f"), ("p99_ms", ".2f"), ("images_per_s", ".3g"),
            ("peak_memory_mib", ".0f"), ("floor_ms", ".3g"), ("roofline_pct", ".1f"))]
        lines.append("| " + " | ".join([row["component"], row["label"] + flag, *cells, ratio]) + " |")
    lines.append("")
    lines.append("batch: images per call (a guided U-Net step runs 2x); 'ours vs it' = its p50 / ours' p50 "
                 "(> 1: ours is faster); U-Net step img/s is per step")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)
