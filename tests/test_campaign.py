"""The GPU campaign (bench/campaign.py) rehearsed on this CPU: the plan fits a lent GPU's calls, every part runs
through the same scripts and leaves at most the four files in $OUT, a resume starts where it is told and refuses
a part that does not exist, a part past its box is killed with its children and keeps the rows it wrote; and
what the headline part times is what it says (the real-size cascade made in memory is diffusers' computation;
"ours" is the fast path)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import campaign  # noqa: E402

GPU_STDOUT = 10_000  # the bound on what one call prints (the device returns the last 12,000)


def test_plan_fits_the_calls_and_puts_the_headline_first():
    plan = subprocess.run(["bash", "bench/gpu_campaign.sh", "--plan"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert plan.returncode == 0, plan.stderr
    totals = {int(line.split()[1].rstrip(":")): int(line.split()[2]) for line in plan.stdout.splitlines()
              if line.startswith("call ")}
    assert totals[1] <= 480 and all(seconds <= campaign.CALL_LIMIT_S for seconds in totals.values()), totals
    assert totals == {call: campaign.call_seconds(call) for call in campaign.CALLS}
    first = campaign.PARTS[0]
    assert first.name == "headline" and first.call == 1 and first.box_s <= campaign.HEADLINE_BY_S
    for part in campaign.PARTS:
        assert f"{part.name} " in plan.stdout and f"{part.box_s} s" in plan.stdout
        assert "max-autotune" not in " ".join(part.command(campaign.Mode(False, Path("/w"))) or []), part.name


def test_a_resume_names_a_part_that_exists(tmp_path):
    assert [p.name for p in campaign.chosen_parts("presets_real", None, False)] == \
        ["presets_real", "batch_fast", "serve_fast"]
    assert {p.call for p in campaign.chosen_parts(None, None, False)} == {1}
    assert [p.name for p in campaign.chosen_parts(None, None, True)] == [p.name for p in campaign.PARTS]
    wrong = subprocess.run(["bash", "bench/gpu_campaign.sh", "--rehearse", "atention"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60,
                           env={**campaign.part_env(None), "OUT": str(tmp_path / "out"),
                                "CAMPAIGN_WORK": str(tmp_path / "work"), "PYTHON": sys.executable})
    assert wrong.returncode != 0 and "no part named 'atention'" in wrong.stderr and "attention_auto" in wrong.stderr
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_a_part_past_its_box_is_killed_with_its_children_and_keeps_its_rows(tmp_path):
    """The part writes one row, starts a child that outlives it, and sleeps past its box."""
    marker = tmp_path / "child.pid"
    script = (f"import json, subprocess, sys, time; json.dump({{'rows': [{{'p50_ms': 1.0}}]}}, open({str(tmp_path / 'p.json')!r}, 'w'));"
              f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
              f"open({str(marker)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    part = campaign.Part("sleeper", 9, 3, "test", lambda mode: [sys.executable, "-c", script])
    start = time.monotonic()
    line, status, _ = campaign.run_part(part, campaign.Mode(False, tmp_path), campaign.Output())  # its own box
    assert status == 124 and "TIMED OUT" in line and time.monotonic() - start < 3 + campaign.KILL_AFTER_S + 5
    child = int(marker.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]
    assert json.loads((tmp_path / "p.json").read_text())["rows"]  # what it wrote before the box ended


def test_the_bench_reports_each_component_as_it_is_timed():
    """engine bench's on_report: a report after every component (incomplete), so a killed part keeps them."""
    from engine.bench import BenchOptions, run

    partial = []
    final = run(BenchOptions(models=("if-i-xl:tiny", "if-ii-l:tiny"), device="cpu", iters=1, warmup=0,
                             compare=("eager",)), on_report=partial.append)
    assert [len(r["rows"]) for r in partial] == [1, 2] and not any(r["complete"] for r in partial)
    assert final["complete"] and [r["component"] for r in final["rows"]] == [r["component"] for r in partial[-1]["rows"]]


def test_the_in_memory_cascade_is_diffusers_computation(tmp_path):
    """if-cascade:tiny through our Pipeline against diffusers' IF pipelines over the same in-memory weights:
    the README's float32 parity bound (1e-4), so the headline's two rows time the same work."""
    from engine.bench import real_size
    from engine.testing.reference import run_reference

    pipe = real_size.load_cascade("if-cascade:tiny", torch.device("cpu"), torch.float32, fast=False, root=tmp_path)
    assert not list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.bin"))  # nothing on disk
    ours = pipe.generate("a red circle", seed=3, steps=(3, 2), guidance=(7.0, 4.0), output_type="np")
    peers = real_size.reference_pipes(pipe, tmp_path, torch.float32)
    theirs = run_reference(peers, ["a red circle"], 3, [3, 2], [7.0, 4.0])
    assert np.abs(ours - theirs).max() <= 1e-4


def test_the_real_size_ours_row_is_the_fast_path(monkeypatch):
    """The real-size "ours" U-Net row runs a FastUNet (static, its calls compiled on a GPU), with the eager
    runtime as its own row; both give diffusers' output (the fast path uncompiled here: a compile is a minute)."""
    from engine.backends.fast_unet import COMPILE_ENV, FastUNet
    from engine.bench import components, real_size

    monkeypatch.setenv(COMPILE_ENV, "0")
    part = real_size.parts("if-i-xl:tiny")[0]
    config = real_size.part_config(part, tiny=True)
    model = real_size.build(part, torch.device("cpu"), torch.float32, tiny=True)
    called = []
    monkeypatch.setattr(FastUNet, "_run", lambda self, *a, run=FastUNet._run: called.append(a[0]) or run(self, *a))
    calls, batch = components.part_calls(part, model, config, 1, config["sample_size"], torch.device("cpu"),
                                         torch.float32, ("eager", "ours"), fast=True, source="test")
    assert set(calls) == {"eager", "ours", "ours_eager"} and batch == 2
    eager = calls["eager"]()
    torch.testing.assert_close(calls["ours"](), eager, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(calls["ours_eager"](), eager, rtol=1e-4, atol=1e-4)
    assert called == ["unet"]


def test_rehearsal_runs_every_part_and_a_resume_from_the_middle(tmp_path):
    """`--rehearse --all` on this CPU: every part exits 0 or is skipped with its reason; $OUT holds the four
    files after each part; stdout stays under the device's bound. Then a resume from a middle part of call 2."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**campaign.part_env(None), "OUT": str(out), "CAMPAIGN_WORK": str(work), "PYTHON": sys.executable}
    whole = subprocess.run(["bash", "bench/gpu_campaign.sh", "--rehearse", "--all"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=900)
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    assert len(whole.stdout) < GPU_STDOUT
    assert sorted(p.name for p in out.iterdir()) == sorted(campaign.OUT_FILES)
    outcomes = (out / "parts.txt").read_text()
    for part in campaign.PARTS:
        assert f"{part.name}: ok, exit 0" in outcomes or f"{part.name}: skipped (" in outcomes, (part.name, outcomes)
    with tarfile.open(out / "campaign.tar.gz") as archive:
        headline = json.load(archive.extractfile("campaign/headline.json"))
    assert headline["complete"] and {r["variant"] for r in headline["rows"]} >= {"eager", "ours", "ours_eager"}
    assert any(r["component"].startswith("whole cascade") and r["variant"] == "eager" for r in headline["rows"])
    assert "## headline" in (out / "summary.md").read_text()

    resumed = subprocess.run(["bash", "bench/gpu_campaign.sh", "--rehearse", "serve_fast"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    last = (out / "parts.txt").read_text().split("\n== ")[-1]
    assert "not run this time (before serve_fast in call 2): compile_peer, kernel_tests, attention_auto" in last
    ran = [line.split(":")[0] for line in last.splitlines()[2:] if line]
    assert ran == ["serve_fast"], last
    assert sorted(p.name for p in out.iterdir()) == sorted(campaign.OUT_FILES)
