"""The GPU campaign: what a lent GPU measures, as time-boxed parts in device calls that fit its 15 minutes.

    bash bench/gpu_campaign.sh --plan            every part, its box and what it measures; each call's total
    bash bench/gpu_campaign.sh                   call 1 (the headline table first)
    bash bench/gpu_campaign.sh --call 2          call 2 (then 3 and 4), ordered by value
    bash bench/gpu_campaign.sh PART              from PART to the end of its call (a resume: a call that ran
                                                 out of time goes on where parts.txt says it stopped)
    bash bench/gpu_campaign.sh --rehearse [--all | --call N | PART]
                                                 the same parts on this CPU: the same scripts, arguments, JSON,
                                                 archive and resume logic, with tiny models and few iterations
                                                 (tests/test_campaign.py runs it in CI)

The rehearsal leaves out only what needs CUDA, each replaced by its CPU form where one exists: the fast path's
compile (AOTInductor, a minute per shape here) -> its uncompiled static calls (CASCADE_FAST_COMPILE=0); the
torch.compile peer's inductor -> dynamo with the eager backend (CASCADE_BENCH_COMPILE_BACKEND=eager); CUDA
graph capture -> none (the executor captures on CUDA only); CUDA events -> perf_counter (engine/bench/timing.py);
the GPU tests -> their CPU form (CASCADE_GPU_TESTS_ON_CPU=1, tests/test_gpu.py); the attention kernel ->
Triton's interpreter; the allocator's peaks (offload), libcuda (native) -> no form, skipped. Every part gets
REHEARSAL_BOX_S there, not its GPU box.

Each part is one process in its own session, killed (SIGTERM, then SIGKILL 10 s later) when its box ends; a
timed-out or failed part loses only itself, and the benches write their JSON as they go, so it keeps what it
finished. Logs and JSON go to a work folder ($CAMPAIGN_WORK, default /tmp/campaign-work); after each part,
$OUT is rewritten to hold four files: campaign.tar.gz (the work folder), parts.txt (each part's outcome),
summary.md (the tables so far) and device.txt. stdout stays under STDOUT_LIMIT characters (a device call
returns only the last 12,000).

Nothing a part needs is left on disk by another: the real-size cascade is made in device memory by each part
that times it (engine/bench/real_size.py load_cascade), so a resume on a fresh machine lacks nothing. A part
whose condition is false here (no carried native library, no FastAPI, no ONNX Runtime CUDA build; a CUDA-only
measurement in the rehearsal) is reported as skipped, with the reason.

The boxes and the compile times they assume are explained in bench/RESULTS.md ("The GPU campaign's plan").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
CALL_LIMIT_S = 480  # boxes per device call: 600 s per call, less machine start-up, transfers and the packing
HEADLINE_BY_S = 240  # the headline table is in by then
KILL_AFTER_S = 10  # SIGTERM, then this long before SIGKILL
REHEARSAL_BOX_S = 240  # the rehearsal's box for every part: a 2-core CPU, often shared, is no GPU's measure
STDOUT_LIMIT = 9_000  # characters this script prints in one call (the device returns the last 12,000)
OUT_FILES = ("campaign.tar.gz", "parts.txt", "summary.md", "device.txt")  # all that $OUT holds


@dataclass(frozen=True)
class Mode:
    """Where the campaign runs: on the GPU (real sizes, CUDA) or rehearsed on this CPU (tiny, few iterations)."""

    rehearse: bool
    work: Path  # logs and JSON, packed into $OUT after each part

    @property
    def device(self) -> str:
        return "cpu" if self.rehearse else "cuda"

    @property
    def size(self) -> str:  # real_size names: NAME:random at real size, NAME:tiny scaled down
        return "tiny" if self.rehearse else "random"

    def pick(self, gpu, cpu):
        """The GPU's value, or the rehearsal's."""
        return cpu if self.rehearse else gpu

    def json(self, name: str) -> str:
        return str(self.work / f"{name}.json")

    def box(self, part: "Part") -> int:
        return max(part.box_s, REHEARSAL_BOX_S) if self.rehearse else part.box_s


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def _bench(mode: Mode, name: str, models: list[str], *args: str) -> list[str]:
    """`python -m engine bench` on `models` at the mode's device and counts, its JSON named for the part."""
    return _python("-m", "engine", "bench", "--model", *models, "--device", mode.device,
                   "--iters", mode.pick("10", "2"), "--warmup", mode.pick("2", "0"), *args, "--json", mode.json(name))


def _have(module: str) -> bool:
    return subprocess.run(_python("-c", f"import {module}"), capture_output=True, env=part_env(None)).returncode == 0


def _ort_cuda() -> bool:
    code = "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())"
    return subprocess.run(_python("-c", code), capture_output=True, env=part_env(None)).returncode == 0


@dataclass(frozen=True)
class Part:
    """One time-boxed measurement. `command` gives its argv for a mode, or None where it has no form there;
    `unless` gives why it cannot run here (None: it can)."""

    name: str
    call: int
    box_s: int
    what: str  # what it measures, and what its box assumes (the plan prints it)
    command: Callable[[Mode], list[str] | None]
    unless: Callable[[Mode], str | None] = lambda mode: None
    env: tuple[tuple[str, str], ...] = ()  # extra environment, both modes
    rehearse_env: tuple[tuple[str, str], ...] = ()  # extra environment in the rehearsal only


def _cuda_only(reason: str) -> Callable[[Mode], str | None]:
    return lambda mode: f"no CPU form: {reason}" if mode.rehearse else None


FAST_TESTS = "fast_path or scheduler or auto_attention"  # the GPU tests that compile (tiny U-Nets, per shape)

PARTS = (
    # -- call 1: the headline first, then the tests that say it can be trusted --------------------------------
    Part("headline", 1, 240,
         "the real-size cascade (T5-XXL, IF-I-XL, IF-II-L) made in memory: each U-Net's CFG step, diffusers "
         "eager against ours (the fast path: compiled, captured), then whole images with T5-XXL, ours against "
         "diffusers' IF pipelines; inductor compiles IF-I-XL and IF-II-L once each (about 60-90 s and 40-60 s)",
         lambda m: _bench(m, "headline", [f"if-cascade:{m.size}"], "--compare", "eager,ours",
                          "--iters", m.pick("20", "2"), "--whole-iters", m.pick("3", "1"),
                          *m.pick([], ["--steps", "2", "2", "--fast"]))),
    Part("tests", 1, 60,
         "tests/test_gpu.py without a compile: half precision and float32 against CPU float32 (the fragile "
         "test last, with the float32 check beside it that says whether a failure is the device path or the "
         "precision), offload, ONNX Runtime and TensorRT where present",
         lambda m: _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k",
                           f"not ({FAST_TESTS})")),
    Part("tests_fast", 1, 120,
         "tests/test_gpu.py's fast path: capture and replay across requests, feature caching in graphs, no "
         "allocation or sync in a replay, the scheduler's graphs, attention='auto'; each against eager float32. "
         "One shared pipeline: the tiny U-Nets compile once per shape and call kind (seconds each)",
         lambda m: _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k", FAST_TESTS)),
    Part("attention", 1, 40, "the attention kernel against SDPA per real shape (no compile)",
         lambda m: _python("bench/attention.py", *m.pick([], ["--smoke"]), "--json", m.json("attention")),
         rehearse_env=(("TRITON_INTERPRET", "1"),)),  # the kernel on CPU tensors: Triton's interpreter
    Part("native", 1, 20, "the native kernel library's GPU test (carried in .native/)",
         lambda m: [str(ROOT / ".native/test_gpu_attention")],
         unless=lambda m: _cuda_only("it opens libcuda")(m) or (
             None if (ROOT / ".native/libcascade_kernels.so").is_file() else
             "no .native/: build it here with bash bench/gpu_checks.sh --fetch-wheels and carry it"),
         env=(("CASCADE_KERNELS_LIB", str(ROOT / ".native/libcascade_kernels.so")),
              ("LD_LIBRARY_PATH", str(ROOT / ".native")))),
    # -- call 2, by value: the torch.compile peer first ---------------------------------------------------------
    Part("compile_peer", 2, 150,
         "diffusers' U-Nets under torch.compile (mode default: no max-autotune) beside eager, IF-I-XL then "
         "IF-II-L, each compile timed as its first call; inductor's own compile times decide the box",
         lambda m: _bench(m, "compile_peer", [f"if-i-xl:{m.size}", f"if-ii-l:{m.size}"], "--compare",
                          "eager,compile", "--compile-mode", "default")),
    Part("kernel_tests", 2, 60,
         "the attention kernel's tests on CUDA (autotuned per key: its box holds the tuning)",
         lambda m: _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_attention_kernel.py",
                           *m.pick([], ["-k", "test_head_dims_and_dtypes and float32 and 64"]))),
    Part("attention_auto", 2, 60,
         "attention='auto' on the real-size U-Nets as the eager runtime runs them (channels_last, CUDA events): "
         "the choice and both times, no compile",
         lambda m: _python("bench/attention_auto.py", "--model", f"if-cascade:{m.size}", "--device", m.device,
                           "--no-fast", "--json", m.json("attention_auto"))),
    Part("presets_real", 2, 90,
         "the packaged model's presets (turbo: feature caching) against the defaults on the real-size cascade, "
         "whole images interleaved, eager U-Nets (no compile)",
         lambda m: _python("bench/preset_speed.py", "--model", f"if-cascade:{m.size}", "--device", m.device,
                           "--dtype", m.pick("float16", "float32"), "--presets-of", "shapes", "--only", "turbo",
                           "--rounds", m.pick("4", "1"), "--json", m.json("presets_real"))),
    Part("batch_fast", 2, 45, "engine.batch with and without the fast path on the packaged model",
         lambda m: _python("bench/batch_throughput.py", "--fast-vs-eager", "--device", m.device,
                           "--rows", m.pick("32", "2"), "--rounds", m.pick("2", "1"),
                           *m.pick([], ["--steps", "2", "2"]), "--json", m.json("batch_fast"))),
    Part("serve_fast", 2, 55, "the server with and without the fast path at one offered load",
         lambda m: _python("bench/serve_load.py", "--fast-vs-eager", "--device", m.device,
                           "--requests", m.pick("24", "2"), "--overload", m.pick("4", "1"),
                           *m.pick([], ["--steps", "2", "2"]), "--ready", m.pick("30", "120"),
                           "--json", m.json("serve_fast")),
         unless=lambda m: None if _have("fastapi") and _have("uvicorn") and _have("httpx") else
         "FastAPI, uvicorn or httpx missing: carry .whl (bash bench/gpu_checks.sh --fetch-wheels)"),
    # -- call 3 ----------------------------------------------------------------------------------------------
    Part("offload", 3, 60, "offload='model' on the real-size cascade: each phase's peak against the plan",
         lambda m: _python("bench/offload_memory.py", "--json", m.json("offload")),
         unless=_cuda_only("it reads the CUDA allocator's peaks")),
    Part("gate_float16", 3, 30, "the quality gate in float16 on the packaged model (within 2 points of float32)",
         lambda m: _python("-m", "engine", "eval", "--device", m.device, "--dtype", m.pick("float16", "float32"),
                           "--count", m.pick("64", "2"), "--quiet", "--json", m.json("gate_float16"))),
    Part("gate_bfloat16", 3, 30, "the quality gate in bfloat16",
         lambda m: _python("-m", "engine", "eval", "--device", m.device, "--dtype", "bfloat16",
                           "--count", m.pick("64", "2"), "--quiet", "--json", m.json("gate_bfloat16"))),
    Part("parts", 3, 60, "T5-XXL and the x4 upscaler's parts, eager against ours (the x4 U-Net compiles once)",
         lambda m: _bench(m, "parts", [f"t5-xxl:{m.size}", f"sd-x4-upscaler:{m.size}"], "--compare", "eager,ours",
                          *m.pick([], ["--fast"]))),
    Part("shapes", 3, 40, "the packaged cascade, ours on the fast path against diffusers",
         lambda m: _bench(m, "shapes", ["shapes"], "--fast", *m.pick([], ["--steps", "2", "2"]))),
    Part("ort_cuda", 3, 40, "ONNX Runtime's CUDA provider against torch (bench/gpu_ort.sh stages its build)",
         lambda m: _python("-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py", "-k", "onnxruntime"),
         unless=lambda m: None if m.rehearse or _ort_cuda() else
         "onnxruntime has no CUDA provider here: stage it first (bash bench/gpu_ort.sh)"),
    # -- call 4: the costliest left --------------------------------------------------------------------------
    Part("attention_auto_fast", 4, 240,
         "attention='auto' as the fast path runs it: each choice compiled and replayed from a graph, per U-Net "
         "(four real-size compiles, about 60 s each)",
         lambda m: _python("bench/attention_auto.py", "--model", f"if-cascade:{m.size}", "--device", m.device,
                           "--fast", "--json", m.json("attention_auto_fast"))),
)
BY_NAME = {part.name: part for part in PARTS}
CALLS = sorted({part.call for part in PARTS})


def part_env(part: Part | None, mode: Mode | None = None) -> dict[str, str]:
    """The environment a part runs in: the checkout and the carried wheels (/tmp/site) on PYTHONPATH, written
    out (not a trailing ':'); in the rehearsal, the fast path uncompiled and the GPU tests on the CPU."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = [str(ROOT), *(p for p in ("/tmp/site", "/tmp/ort-site") if os.path.isdir(p))]
    env["PYTHONPATH"] = os.pathsep.join([*paths, *filter(None, [os.environ.get("PYTHONPATH")])])
    if mode is not None and mode.rehearse:
        env.update(CASCADE_FAST_COMPILE="0", CASCADE_BENCH_COMPILE_BACKEND="eager", CASCADE_GPU_TESTS_ON_CPU="1",
                   CUDA_VISIBLE_DEVICES="")
    env.update(part.env if part else ())
    if mode is not None and mode.rehearse and part is not None:
        env.update(part.rehearse_env)
    return env


def plan_text() -> str:
    """Each part with its box and what it measures, then each call's total."""
    lines = []
    for call in CALLS:
        lines.append(f"-- call {call}")
        start = 0
        for part in (p for p in PARTS if p.call == call):
            lines.append(f"{part.name:15} {part.box_s:4d} s  (at {start:3d}-{start + part.box_s:3d} s)  {part.what}")
            start += part.box_s
    lines += [f"call {call}: {call_seconds(call)} s" for call in CALLS]
    return "\n".join(lines)


def call_seconds(call: int) -> int:
    return sum(part.box_s for part in PARTS if part.call == call)


def chosen_parts(start: str | None, call: int | None, every: bool) -> list[Part]:
    """The parts this invocation runs: every call's (--all), one call's, or from part `start` to its call's end."""
    if every:
        return list(PARTS)
    if start is not None:
        if start not in BY_NAME:
            raise SystemExit(f"no part named {start!r}; the parts are: {', '.join(BY_NAME)}")
        first = BY_NAME[start]
        same = [p for p in PARTS if p.call == first.call]
        return same[same.index(first):]
    call = call or 1
    if call not in CALLS:
        raise SystemExit(f"no call {call}; the calls are {', '.join(map(str, CALLS))}")
    return [p for p in PARTS if p.call == call]


class Output:
    """What this script prints, capped at STDOUT_LIMIT characters (the rest is in $OUT)."""

    def __init__(self, limit: int = STDOUT_LIMIT):
        self.left = limit

    def say(self, text: str) -> None:
        if self.left <= 0:
            return
        text = text if len(text) < self.left else text[:max(self.left - 60, 0)] + "\n(output capped: see $OUT)"
        self.left -= len(text) + 1
        print(text, flush=True)


def run_part(part: Part, mode: Mode, out: Output) -> tuple[str, int | None, float]:
    """Run one part time-boxed: (its outcome line, its exit status or None where skipped, seconds)."""
    why = part.unless(mode)
    command = part.command(mode)
    if why is None and command is None:
        why = "no form on this machine"
    if why is not None:
        return f"{part.name}: skipped ({why})", None, 0.0
    log = mode.work / f"{part.name}.log"
    start = time.monotonic()
    with open(log, "w") as file:
        process = subprocess.Popen(command, cwd=ROOT, env=part_env(part, mode), stdout=file,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            status = process.wait(timeout=mode.box(part))
        except subprocess.TimeoutExpired:
            _stop(process)
            status = 124
    seconds = time.monotonic() - start
    ended = {0: "ok", 124: "TIMED OUT"}.get(status, "FAILED")
    line = f"{part.name}: {ended}, exit {status} after {seconds:.0f} s (box {mode.box(part)} s)"
    tail = [t[:200] for t in log.read_text(errors="replace").splitlines()[-3:]] if status else []
    out.say("\n".join([line, *("    " + t for t in tail)]))
    return line, status, seconds


def _stop(process: subprocess.Popen) -> None:
    """The part's whole process group: SIGTERM, then SIGKILL KILL_AFTER_S later (a server it started too)."""
    for sig, wait in ((signal.SIGTERM, KILL_AFTER_S), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def summary(work: Path, lines: list[str]) -> str:
    """The tables so far: each JSON's rows (an engine bench report's component, variant, p50, ratio), else the
    names of its figures; a row per part's outcome first."""
    text = ["# GPU campaign: summary so far", "", *[f"- {line}" for line in lines], ""]
    for path in sorted(work.glob("*.json")):
        try:
            report = json.loads(path.read_text())
        except (OSError, ValueError):
            text.append(f"## {path.stem}: unreadable JSON\n")
            continue
        rows = report.get("rows") if isinstance(report, dict) else None
        partial = "" if report.get("complete", True) else " (partial: the part stopped before its end)"
        text.append(f"## {path.stem}{partial}")
        if isinstance(rows, list) and rows and isinstance(rows[0], dict) and "p50_ms" in rows[0]:
            text += ["", "| component | variant | p50 ms | p90 ms | ours vs it |", "|---|---|---:|---:|---:|"]
            for row in rows:
                ratio = row.get("ours_speedup")
                shown = "-" if ratio is None or row.get("variant") == "ours" else f"{ratio:.2f}x"
                text.append(f"| {row.get('component')} | {row.get('label', row.get('variant'))} | "
                            f"{row['p50_ms']:.2f} | {row.get('p90_ms', 0):.2f} | {shown} |")
        elif isinstance(rows, list):
            text += [f"- {json.dumps(row)[:300]}" for row in rows[:20]]
        else:  # a script's own report: its figures (numbers and short values) as they are
            text += [f"- {key}: {json.dumps(value)[:200]}" for key, value in report.items()
                     if isinstance(value, (int, float, bool)) or (isinstance(value, list) and len(value) <= 8)
                     or (isinstance(value, str) and len(value) <= 80)]
        text.append("")
    return "\n".join(text)


def pack(out_dir: Path, work: Path, lines: list[str]) -> None:
    """$OUT rewritten: the work folder as one archive, parts.txt, summary.md, device.txt (nothing else)."""
    (work / "parts.txt").write_text("\n".join(lines) + "\n")
    partial = out_dir / ".campaign.tar.gz.partial"
    with tarfile.open(partial, "w:gz") as archive:
        archive.add(work, arcname="campaign")
    os.replace(partial, out_dir / "campaign.tar.gz")
    (out_dir / "parts.txt").write_text("\n".join(lines) + "\n")
    (out_dir / "summary.md").write_text(summary(work, lines))
    if (work / "device.txt").is_file():
        shutil.copyfile(work / "device.txt", out_dir / "device.txt")
    for stray in out_dir.iterdir():  # only OUT_FILES leave the machine
        if stray.name not in OUT_FILES:
            shutil.rmtree(stray) if stray.is_dir() else stray.unlink()


def describe_device(mode: Mode) -> str:
    if mode.rehearse:
        return f"rehearsal on the CPU ({os.cpu_count()} cores), python {sys.version.split()[0]}"
    query = ["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,clocks.max.sm,memory.total", "--format=csv"]
    try:
        return subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi failed: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("part", nargs="?", default=None, help="start at this part; run to the end of its call")
    parser.add_argument("--plan", action="store_true", help="print the parts, their boxes and each call's total")
    parser.add_argument("--call", type=int, default=None, help="run this call's parts (default: call 1)")
    parser.add_argument("--all", action="store_true", help="every call's parts in one go (the rehearsal's test)")
    parser.add_argument("--rehearse", action="store_true", help="on this CPU: tiny models, few iterations")
    args = parser.parse_args(argv)
    if args.plan:
        print(plan_text())
        return 0
    if args.part is not None and (args.call is not None or args.all):
        parser.error("give a part to start at, or --call, or --all: not both")
    parts = chosen_parts(args.part, args.call, args.all)
    out_dir = Path(os.environ.get("OUT") or "/tmp/gpu_campaign")
    work = Path(os.environ.get("CAMPAIGN_WORK") or "/tmp/campaign-work")
    out_dir.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    mode = Mode(args.rehearse, work)
    out = Output()
    (work / "device.txt").write_text(describe_device(mode) + "\n")
    previous = (work / "parts.txt").read_text().splitlines() if (work / "parts.txt").is_file() else []
    lines = [*previous, f"== {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                        f"{'rehearsal' if mode.rehearse else 'GPU'}, parts {', '.join(p.name for p in parts)}"]
    skipped = [p.name for p in PARTS if p.call == parts[0].call and PARTS.index(p) < PARTS.index(parts[0])]
    if skipped and not args.all:
        lines.append(f"not run this time (before {parts[0].name} in call {parts[0].call}): {', '.join(skipped)}")
    out.say("\n".join(lines[len(previous):]))
    failed = False
    for part in parts:
        line, status, _ = run_part(part, mode, out)
        if status is None:
            out.say(line)
        failed |= bool(status)
        lines.append(line)
        pack(out_dir, work, lines)
    out.say(f"$OUT: {', '.join(sorted(p.name for p in out_dir.iterdir()))}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
