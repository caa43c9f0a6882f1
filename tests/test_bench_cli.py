"""`python -m engine bench`: the report it writes, the real-size architectures, the scaled-down path, bad input.

No timing assertions: only that every figure is there, positive and finite. Iteration counts are 1.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.bench import real_size
from engine.bench.report import compare_to_baseline
from engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
# One thread: nothing here is timed, and on a shared 2-core machine two threads wait on each other's busy core.
QUICK = ["--iters", "1", "--warmup", "0", "--threads", "1", "--quiet"]


@pytest.fixture(autouse=True)
def restore_threads():
    """--threads changes torch's process-wide thread count: put it back for the other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _positive(row, *keys):
    for key in keys:
        assert row[key] is not None and math.isfinite(row[key]) and row[key] > 0, (row["component"], key, row[key])


def test_bench_packaged_model_writes_report(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CASCADE_ENGINE_CACHE", str(tmp_path / "cache"))  # empty: no ONNX Runtime rows
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "2", "1", "--device", "cpu", *QUICK, "--cache", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["command"].startswith("python -m engine bench --steps 2 1")
    assert report["device"]["type"] == "cpu" and report["device"]["name"]
    assert {"torch", "diffusers", "transformers", "engine", "onnxruntime", "onnx"} <= set(report["versions"])
    assert report["versions"]["onnxruntime"]  # installed with the tests
    assert len(report["git"]["commit"]) == 40 and isinstance(report["git"]["dirty"], bool)
    assert report["matmul_peak_tflops"]["float32"] > 0
    rows = {(r["component"], r["variant"]): r for r in report["rows"]}
    components = {c for c, _ in rows}
    assert {"text encoder", "stage_I U-Net step (32 px)", "stage_II U-Net step (128 px)",
            "stage_I U-Net shallow step (32 px, cache depth 1)", "stage_II U-Net shallow step (128 px, cache depth 1)",
            "stage_I (2 steps, 32 px)", "stage_II (1 steps, 128 px)", "whole cascade (2+1 steps, 128 px)",
            "whole cascade (2+1 steps, 128 px, cache=2)"} == components
    cached, plain = rows[("whole cascade (2+1 steps, 128 px, cache=2)", "ours")], rows[("whole cascade (2+1 steps, 128 px)", "ours")]
    assert 0 < cached["flops"] < plain["flops"]  # its second stage I step is shallow
    for stage in ("stage_I", "stage_II"):  # feature caching's shallow step: fewer FLOPs than the full step's
        shallow = rows[(f"{stage} U-Net shallow step ({32 if stage == 'stage_I' else 128} px, cache depth 1)", "ours")]
        full = rows[(f"{stage} U-Net step ({32 if stage == 'stage_I' else 128} px)", "ours")]
        assert 0 < shallow["flops"] < full["flops"] / 2 and shallow["finite"]
    for variant in ("eager", "ours"):  # side by side: U-Net steps and the whole cascade, with diffusers
        for component in ("stage_I U-Net step (32 px)", "stage_II U-Net step (128 px)",
                          "whole cascade (2+1 steps, 128 px)"):
            row = rows[(component, variant)]
            _positive(row, "p50_ms", "p90_ms", "p99_ms", "images_per_s", "peak_memory_mib", "flops", "floor_ms",
                      "roofline_pct", "ours_speedup")
            assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] and row["finite"]
            assert row["n"] == 1 and row["min_ms"] <= row["p50_ms"] and row["iqr_ms"] == 0 == row["std_ms"]
            assert row["p99_reliable"] is False  # one sample: flagged
    assert rows[("stage_I U-Net step (32 px)", "ours")]["batch"] == 2  # CFG: 2 x images
    for row in report["rows"]:
        _positive(row, "p50_ms", "images_per_s", "flops", "floor_ms")
    assert "onnxruntime" not in {r["variant"] for r in report["rows"]}
    table = capsys.readouterr().out
    assert "| component | variant | n | min ms | p50 ms | IQR ms" in table and "whole cascade" in table
    assert "diffusers eager" in table and "p99*: from fewer than 20 samples" in table

    # A regression check against a baseline whose every p50 was half of this run's: each row is 2x slower.
    halved = tmp_path / "fast.json"
    halved.write_text(json.dumps(report | {"rows": [r | {"p50_ms": r["p50_ms"] / 2} for r in report["rows"]]}))
    assert main(["bench", "--steps", "1", "--device", "cpu", *QUICK, "--baseline", str(halved)]) == 1
    captured = capsys.readouterr()
    assert "REGRESSION" in captured.out and "regression: stage_I U-Net step (32 px) ours:" in captured.err


def test_the_baseline_comparison_names_new_gone_and_slower_rows():
    row = {"component": "c", "variant": "ours", "batch": 2, "p50_ms": 10.0}
    baseline = {"rows": [row, row | {"variant": "eager"}], "date": "d", "command": "cmd"}
    text, regressions = compare_to_baseline({"rows": [row | {"p50_ms": 11.5}, row | {"variant": "compile"}]}, baseline)
    assert regressions == ["c ours: 1.15x the baseline's p50"]
    assert "| c | ours | 10.00 | 11.50 | 1.15x REGRESSION |" in text
    assert "| c | compile | - | 10.00 | new |" in text and "| c | eager | 10.00 | - | gone |" in text
    assert compare_to_baseline({"rows": [row | {"p50_ms": 10.9}]}, baseline)[1] == []  # within 1.10x


@pytest.mark.parametrize("name", list(real_size.MODELS))
def test_real_size_architectures_have_the_published_parameter_counts(name):
    for part in real_size.parts(f"{name}:random"):
        model = real_size.on_meta(part)  # shapes only: no memory, no init
        assert next(model.parameters()).device.type == "meta"
        assert sum(p.numel() for p in model.parameters()) == real_size.reference_params(part), part.name
        assert real_size.reference_flops(part, tiny=False) > 0


def test_published_counts_are_the_ones_the_reference_states():
    counts = {p.name: sum(t.numel() for t in real_size.on_meta(p).parameters())
              for name in ("if-i-xl", "if-ii-l") for p in real_size.parts(f"{name}:random")}
    assert counts == {"IF-I-XL U-Net step": 4_304_695_110, "IF-II-L U-Net step": 1_243_277_190}


def test_random_init_is_finite_and_cast():
    part = real_size.parts("t5-xxl:tiny")[0]
    model = real_size.build(part, torch.device("cpu"), torch.bfloat16, tiny=True)
    params = dict(model.named_parameters())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params.values())
    weight = params["encoder.block.0.layer.0.SelfAttention.q.weight"]
    assert 0 < weight.float().std() < 1 and weight.float().abs().max() > 0  # random, scaled by 1/sqrt(fan_in)


def test_scaled_down_real_size_models_run_side_by_side(tmp_path):
    out = tmp_path / "tiny.json"
    names = [f"{m}:tiny" for m in real_size.MODELS]
    assert main(["bench", "--model", *names, "--device", "cpu", *QUICK, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["component"].split()[0] for r in rows} == set(names)
    for row in rows:
        assert row["finite"] is True, row["component"]  # random init keeps activations finite
        _positive(row, "p50_ms", "images_per_s", "flops", "floor_ms")
        assert row["flops_source"] == "counted"  # tiny models: FlopCounterMode, not the real-size reference
    unet_steps = [r for r in rows if "U-Net step" in r["component"]]
    assert {r["variant"] for r in unet_steps} == {"eager", "ours"} and all(r["batch"] == 2 for r in unet_steps)
    assert any("no 'ours' row" in note for note in report["notes"])  # VAE and text encoders: eager only


@pytest.mark.parametrize("argv, message", [
    (["--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--model", "if-i-xl"], "if-i-xl:random"),
    (["--iters", "0"], "iters must be an integer >= 1"),
    (["--batch", "0"], "batch must be an integer >= 1"),
    (["--warmup", "-1"], "warmup must be an integer >= 0"),
    (["--compare", "eager,fast"], "unknown --compare variant(s) fast"),
    (["--steps", "0"], "steps"),
    (["--threads", "0"], "threads must be an integer >= 1"),
    (["--cache", "0"], "cache interval must be 1..1000"),
])
def test_bench_bad_input_is_one_clear_error(argv, message, capsys):
    assert main(["bench", "--device", "cpu", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_bench_cuda_without_gpu_is_a_clear_error(capsys):
    assert main(["bench", "--device", "cuda", "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bench_components_run_under_pytest_benchmark():
    pytest.importorskip("pytest_benchmark")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as QUICK's --threads 1
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                           str(ROOT / "bench" / "bench_components.py")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_a_cached_onnx_export_adds_onnx_runtime_rows(tmp_path, monkeypatch):
    from export.cache import cached_export

    monkeypatch.setenv("CASCADE_ENGINE_CACHE", str(tmp_path / "cache"))
    exported = cached_export("shapes", progress=False)
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", "1", "--device", "cpu", *QUICK, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    ort = {r["component"]: r for r in report["rows"] if r["variant"] == "onnxruntime"}
    assert set(ort) == {"stage_I U-Net step (32 px)", "stage_II U-Net step (128 px)", "whole cascade (1+1 steps, 128 px)"}
    for row in ort.values():
        _positive(row, "p50_ms", "ours_speedup")
        assert row["label"] == "ours, ONNX Runtime" and row["finite"] is not False
    assert "onnxruntime" in report["options"]["compare"]
    assert any(str(exported) in note for note in report["notes"])


def test_the_plot_draws_every_row_and_its_floor(tmp_path, capsys):
    import xml.etree.ElementTree as ElementTree

    saved = Path(__file__).resolve().parents[1] / "bench" / "results" / "bench_cpu_fast.json"
    report = json.loads(saved.read_text())
    assert main(["bench", "--plot-from", str(saved), "--plot", str(tmp_path / "plot.svg")]) == 0
    root = ElementTree.parse(tmp_path / "plot.svg").getroot()
    ns = "{http://www.w3.org/2000/svg}"
    boxes = [r for r in root.iter(f"{ns}rect") if r.get("fill-opacity")]
    floors = [line for line in root.iter(f"{ns}line") if line.get("stroke") == "red"]
    texts = [t.text for t in root.iter(f"{ns}text")]
    assert len(boxes) == len(report["rows"])  # one IQR box per row
    assert len(floors) == len({r["component"] for r in report["rows"] if r.get("floor_ms")})
    assert all(any(t and t.startswith(row["label"]) for t in texts) for row in report["rows"])
    assert main(["bench", "--plot-from", str(saved)]) == 2
    assert "give --plot FILE.svg too" in capsys.readouterr().err
