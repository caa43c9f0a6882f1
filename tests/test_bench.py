"""The benchmark scripts run end to end (smoke sizes on CPU) and measure the shapes they claim to."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name):
    # As `python bench/NAME.py` runs it: bench/ on the path, for a script's sibling (serve_model imports serve_load).
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_bench_shapes_are_ifs_real_ones():
    bench = _load("attention")
    shapes = {s["name"]: (s["heads"], s["lq"], s["lk"], s["d"])
              for s in bench.cascade_shapes(json.loads(bench.CONFIGS.read_text()))}
    # IF-I-XL at 64x64: 22 heads at 32x32, 33 at 16x16, 44 at 8x8; keys are 77 text tokens + the image tokens
    assert shapes["IF-I-XL 32x32"] == (22, 1024, 1101, 64)
    assert shapes["IF-I-XL 16x16"] == (33, 256, 333, 64)
    assert shapes["IF-I-XL 8x8"] == (44, 64, 141, 64)
    assert shapes["IF-II-L 32x32"] == (15, 1024, 1101, 64)


def test_attention_bench_smoke_runs_and_checks_correctness(tmp_path):
    bench = _load("attention")
    report = bench.main(["--smoke", "--json", str(tmp_path / "attention.json")])
    saved = json.loads((tmp_path / "attention.json").read_text())
    assert saved["rows"] and saved["rows"][0]["results"]["ours"]["max_abs_err"] < 1e-2
    assert report["rows"][0]["results"]["ours"]["ms"] > 0


def test_onnx_cpu_bench_smoke(cascade_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    bench = _load("onnx_cpu")
    report = bench.main(["--model", str(cascade_dir), "--runs", "1", "--steps-iters", "1",
                         "--json", str(tmp_path / "onnx.json")])
    assert report["max_abs_difference"] <= 1e-3  # the timed backends computed the same images
    assert set(report["unet_step_ms"]) == {"stage_I", "stage_II"}
    assert all(t > 0 for stage in report["unet_step_ms"].values() for t in stage.values())


def test_serve_load_bench_smoke(tmp_path):
    pytest.importorskip("uvicorn")
    bench = _load("serve_load")
    report = bench.main(["--requests", "2", "--rate", "20", "--steps", "1", "1", "--repeat", "2",
                         "--json", str(tmp_path / "s.json")])
    [load] = report["loads"]
    assert set(load["policies"]) == {"none", "request", "step"}
    assert all(p["ok"] == 4 and p["images_per_s_overall"] > 0 for p in load["policies"].values())  # 2 x 2
    assert all(p["mean_batch_images"] >= 1 for p in load["policies"].values())
    assert [r["seed"] for r in load["repeats"]] == [0, 1]
    assert 0 <= load["target_held"] <= 2
    again = bench.main(["--table", str(tmp_path / "s.json")])  # the saved run's tables, judged again
    assert again["loads"][0]["target_held"] == load["target_held"]


def test_arrivals_offer_exactly_the_stated_load_in_a_seeded_poisson_order():
    bench = _load("serve_load")
    times = bench.arrival_times(200, 4.0, seed=3)
    assert times.shape == (200,) and np.all(np.diff(times) > 0) and 0 < times[0]
    assert 49.0 < times[-1] < 50.0  # 200 arrivals at 4/s span 50 s, whatever the seed
    assert np.array_equal(times, bench.arrival_times(200, 4.0, seed=3))
    assert not np.array_equal(times, bench.arrival_times(200, 4.0, seed=4))
    gaps = np.diff(times)  # exponential-like: about as spread as they are long (coefficient of variation ~1)
    assert 0.8 < gaps.std() / gaps.mean() < 1.2


def test_target_needs_both_the_throughput_and_the_tail():
    bench = _load("serve_load")
    run = lambda rate, p99: {"images_per_s_overall": rate, "p99_s": p99}  # noqa: E731
    assert bench.target({"none": run(1.0, 30), "request": run(1.6, 5.0), "step": run(1.6, 4.0)})["target_held"]
    assert not bench.target({"none": run(1.0, 30), "request": run(1.6, 5.0), "step": run(1.4, 4.0)})["target_held"]
    assert not bench.target({"none": run(1.0, 30), "request": run(1.6, 5.0), "step": run(1.6, 5.5)})["target_held"]
    assert bench.target({"none": run(2.0, 30), "request": run(1, 1), "step": run(3.0, 0.5)})["step_vs_none"] == 1.5


def test_steady_rate_counts_only_completions_inside_the_window():
    bench = _load("serve_load")
    # 10 s window from 2 to 12 s: 5 completions inside, the 1 s ones (filling) and the 13 s one (draining) not.
    completions = [1.0, 1.5, 2.0, 4.0, 6.0, 8.0, 11.9, 12.0, 13.0]
    assert bench.steady_rate(completions, (2.0, 12.0)) == pytest.approx(0.5)
    assert np.isnan(bench.steady_rate(completions, (3.0, 3.0)))


def test_serve_model_times_a_lone_request_as_the_sum_of_its_calls():
    model = _load("serve_model")
    costs, per_request = model.COSTS["cpu"]
    alone = 7 * sum(a + c for a, c in costs) + per_request  # 7 steps per stage, batch 1
    for policy in model.POLICIES:
        throughput, p50, p99 = model.simulate(policy, 1e-3, np.array([7]), costs, per_request)
        assert p50 == pytest.approx(alone) and p99 == pytest.approx(alone)
    # Two requests at once: every policy batches them, so both finish sooner than one after the other.
    _, _, p99 = model.simulate("step", 1e6, np.array([7, 7]), costs, per_request)
    assert p99 < 2 * alone


def test_the_real_size_cascade_is_written_in_deepfloyds_layout(tmp_path):
    """What the GPU campaign times at real size (write_cascade(..., tiny=False): 21 GB), here scaled down."""
    from engine.bench.real_size import reference, write_cascade

    root = write_cascade(tmp_path / "if", "cpu", torch.float32, tiny=True)
    pipe = engine.load(root)
    assert [stage.kind for stage in pipe.stages] == ["base", "super_resolution"]
    assert pipe.stages[0].scheduler_config["sample_max_value"] == reference()["IF-I-XL/scheduler"]["sample_max_value"]
    assert pipe.generate("a red circle", seed=0, steps=(2, 2), output_type="np").shape == (1, 32, 32, 3)
    text = pipe.text.model
    assert text.shared.weight is text.encoder.embed_tokens.weight  # tied, as the published T5
