"""The report's frame (device, versions, command) and its readable table; JSON writing."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

from engine.bench.timing import MIN_SAMPLES_P99
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


def git_commit() -> dict:
    """The checkout's commit and whether it has uncommitted changes (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}
    if commit.returncode != 0:
        return {"commit": None, "dirty": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


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
                     "triton": _version("triton"), "onnx": _version("onnx"), "onnxruntime": _version("onnxruntime"),
                     "tensorrt_rtx": _version("tensorrt_rtx_cu13_bindings"), "engine": __version__},
        "git": git_commit(),
    }


def save_json(report: dict, path: Path | None) -> None:
    """The report at `path` (None: nowhere), replaced whole: written beside it, then renamed, so a process killed
    while writing (a time box) leaves the previous version, never half a file. Called after every row by the
    benches that report as they go."""
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, path)


def table_cell(value, fmt: str) -> str:
    """A Markdown table cell: the value formatted, or '-' where there is none."""
    return "-" if value is None else format(value, fmt)


COLUMNS = ("component", "variant", "n", "min ms", "p50 ms", "IQR ms", "p90 ms", "p99 ms", "img/s", "peak MiB",
           "floor ms", "% roofline", "ours vs it")


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
        cells = [table_cell(row.get(name), fmt) for name, fmt in (
            ("n", "d"), ("min_ms", ".2f"), ("p50_ms", ".2f"), ("iqr_ms", ".2f"), ("p90_ms", ".2f"), ("p99_ms", ".2f"),
            ("images_per_s", ".3g"), ("peak_memory_mib", ".0f"), ("floor_ms", ".3g"), ("roofline_pct", ".1f"))]
        if row.get("p99_reliable") is False:
            cells[5] += "*"
        lines.append("| " + " | ".join([row["component"], row["label"] + flag, *cells, ratio]) + " |")
    lines.append("")
    lines.append("batch: images per call (a guided U-Net step runs 2x); 'ours vs it' = its p50 / ours' p50 "
                 "(> 1: ours is faster); U-Net step img/s is per step; IQR = p75 - p25")
    if any(row.get("p99_reliable") is False for row in report["rows"]):
        lines.append(f"p99*: from fewer than {MIN_SAMPLES_P99} samples, little more than the slowest call (--iters)")
    lines += [f"note: {note}" for note in report["notes"]]
    return "\n".join(lines)


DEFAULT_REGRESSION = 1.10  # --baseline: a row more than 10% slower at p50 than the baseline's is a regression


def compare_to_baseline(report: dict, baseline: dict, threshold: float = DEFAULT_REGRESSION) -> tuple[str, list[str]]:
    """(a table of each row's p50 against the baseline's row of the same component, variant and batch, the
    rows slower than `threshold` times the baseline). Rows only one side has are listed as such."""
    def key(row):
        return row["component"], row["variant"], row.get("batch")

    old = {key(row): row for row in baseline.get("rows", [])}
    lines = [f"against {baseline.get('command') or 'the baseline'} ({baseline.get('date')}, "
             f"{baseline.get('device', {}).get('name')}, commit {(baseline.get('git') or {}).get('commit')})",
             "", "| component | variant | baseline p50 ms | p50 ms | ratio |", "|---|---|---:|---:|---:|"]
    regressions = []
    for row in report["rows"]:
        before = old.pop(key(row), None)
        if before is None:
            lines.append(f"| {row['component']} | {row['variant']} | - | {row['p50_ms']:.2f} | new |")
            continue
        ratio = row["p50_ms"] / before["p50_ms"]
        slower = ratio > threshold
        if slower:
            regressions.append(f"{row['component']} {row['variant']}: {ratio:.2f}x the baseline's p50")
        lines.append(f"| {row['component']} | {row['variant']} | {before['p50_ms']:.2f} | {row['p50_ms']:.2f} | "
                     f"{ratio:.2f}x{' REGRESSION' if slower else ''} |")
    lines += [f"| {c} | {v} | {r['p50_ms']:.2f} | - | gone |" for (c, v, _), r in old.items()]
    lines.append(f"ratio = p50 / the baseline's (> 1: slower); a regression is > {threshold:.2f}x")
    return "\n".join(lines), regressions
