"""Batch jobs on a local Ray cluster (Ray Data, 2 workers, the tiny random cascade): the images equal the job
on one process byte for byte, a killed worker or driver loses nothing and makes nothing twice, a damaged image
is redone, bad rows are reported by line, and a model that cannot load fails the job with the worker's own
error."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from engine.errors import EngineError, InvalidRequestError  # noqa: E402
from engine.offline import batch  # noqa: E402
from engine.ray_batch import RayOptions, work_items  # noqa: E402
from engine.batch_job import Plan, Row  # noqa: E402
from test_batch import check_complete, manifest, pixels  # noqa: E402

TWO = RayOptions(workers=2)  # one CPU each: Ray sets their torch threads to 1


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def mixed_rows(path, count=8):
    """Rows with different steps, n, and one seedless: they group into several work items."""
    rows = [{"prompt": f"a red circle {k}", "seed": k, "steps": [3, 2] if k % 3 else [2, 2], "n": 1 + k % 2}
            for k in range(count)]
    rows[1].pop("seed")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, sum(row["n"] for row in rows)


def by_image(out) -> dict:
    return {(e["row"], e["image"]): e for e in manifest(out)}


class one_thread:
    """torch on one thread here, as in each Ray worker (num_cpus=1): CPU kernels' last bits depend on the thread
    count, so byte equality is asked for at equal thread counts."""

    def __enter__(self):
        self.threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads)


def with_seeds(rows, out, path):
    """`rows` with every row's seed as the job in `out` recorded it (the seedless rows' drawn ones)."""
    seeds = {e["row"]: e["request"]["seed"] for e in manifest(out)}
    path.write_text("".join(json.dumps({**json.loads(line), "seed": seeds[k]}) + "\n"
                            for k, line in enumerate(rows.read_text().splitlines(), 1)))
    return path


def hashes(out) -> dict:
    return {key: e["sha256"] for key, e in by_image(out).items()}


def test_images_equal_the_job_on_one_process(ray_cluster, cascade_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"  # a catalogue's usual job: one setting for every row, one seedless row
    rows.write_text("".join(json.dumps({"prompt": f"a red circle {k}", "steps": [3, 2], **({"seed": k} if k else {})})
                            + "\n" for k in range(6)))
    summary = batch(rows, tmp_path / "ray", model=str(cascade_dir), max_batch=2, ray=TWO, progress=False)
    assert summary.images_written == 6 and len(summary.workers) == 2  # both workers made images
    on_ray = check_complete(tmp_path / "ray", 6)
    assert [(e["row"], e["image"]) for e in on_ray] == sorted((e["row"], e["image"]) for e in on_ray)  # row order
    with one_thread():
        batch(with_seeds(rows, tmp_path / "ray", tmp_path / "seeded.jsonl"), tmp_path / "local",
              model=str(cascade_dir), max_batch=2, progress=False)
    assert hashes(tmp_path / "ray") == hashes(tmp_path / "local")


def test_mixed_settings_give_the_same_bytes_whatever_the_workers(ray_cluster, cascade_dir, tmp_path):
    """Work items are fixed by the plan, not by the workers: one worker or two, the same bytes. Against the job
    on one process, whose scheduler admits rows in input order and so gives a row other batch-mates than the
    settings-grouped items do, CPU kernels' last bits may differ: within one level of 255."""
    rows, images = mixed_rows(tmp_path / "rows.jsonl")
    batch(rows, tmp_path / "two", model=str(cascade_dir), max_batch=2, ray=TWO, progress=False)
    seeded = with_seeds(rows, tmp_path / "two", tmp_path / "seeded.jsonl")
    batch(seeded, tmp_path / "one", model=str(cascade_dir), max_batch=2, ray=RayOptions(workers=1), progress=False)
    assert hashes(tmp_path / "one") == hashes(tmp_path / "two")
    with one_thread():
        batch(seeded, tmp_path / "local", model=str(cascade_dir), max_batch=2, progress=False)
    for e in check_complete(tmp_path / "local", images):
        assert np.abs(pixels(tmp_path / "local" / e["file"]) - pixels(tmp_path / "two" / e["file"])).max() <= 1


def test_a_killed_worker_is_replaced_and_its_rows_redone(ray_cluster, cascade_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"a red circle {k}", "seed": k, "steps": [8, 6]}) + "\n"
                            for k in range(12)))
    out = tmp_path / "out"
    outcome = {}
    job = threading.Thread(target=lambda: outcome.update(summary=batch(rows, out, model=str(cascade_dir),
                                                                       max_batch=2, ray=TWO, progress=False)))
    job.start()
    deadline = time.monotonic() + 180
    while not ((out / "manifest.jsonl").exists() and manifest(out)):
        assert time.monotonic() < deadline and job.is_alive(), "the job made no image"
        time.sleep(0.05)
    victim = manifest(out)[0]["worker"]
    os.kill(int(victim.rpartition(":")[2]), signal.SIGKILL)  # mid-job: the worker has more items to run
    job.join(timeout=300)
    assert not job.is_alive() and outcome["summary"].images_written == 12
    entries = check_complete(out, 12)  # every image once, hashes matching
    assert len({e["worker"] for e in entries}) >= 2
    assert not any((out / ".partial").iterdir())


def _job(cascade_dir, rows, out):
    return subprocess.Popen([sys.executable, "-m", "engine", "batch", str(rows), "--out", str(out), "--model",
                             str(cascade_dir), "--max-batch", "2", "--quiet", "--ray", "--workers", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(out, count: int, driver) -> None:
    deadline = time.monotonic() + 180
    while not ((out / "manifest.jsonl").exists() and len(manifest(out)) >= count):
        assert time.monotonic() < deadline and driver.poll() is None, driver.communicate()
        time.sleep(0.05)


def test_a_driver_stopped_by_ctrl_c_or_killed_is_resumed_by_the_same_command(cascade_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"a red circle {k}", "steps": [8, 6]}) + "\n"  # seedless
                            for k in range(12)))
    out = tmp_path / "out"
    driver = _job(cascade_dir, rows, out)
    try:
        _wait_for(out, 1, driver)
        driver.send_signal(signal.SIGINT)  # Ctrl-C: stops at once, exit 130
        stdout, stderr = driver.communicate(timeout=60)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 130 and "run the same command again" in stdout, stderr
    kept = len(manifest(out))
    driver = _job(cascade_dir, rows, out)
    try:
        _wait_for(out, kept + 2, driver)
        driver.kill()  # then the driver alone, by its PID
        driver.wait()
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # and its local Ray cluster, before the rerun
    before = by_image(out)
    assert kept + 2 <= len(before) < 12
    rerun = _job(cascade_dir, rows, out)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr
    assert f"{len(before)} already there" in stdout and "worker" in stdout  # the report, per worker
    after = {(e["row"], e["image"]): e for e in check_complete(out, 12)}
    for key, entry in before.items():  # kept as they were: same file, hash and seed
        assert after[key]["sha256"] == entry["sha256"] and after[key]["request"]["seed"] == entry["request"]["seed"]


def test_a_damaged_image_is_redone_and_the_rest_kept(ray_cluster, cascade_dir, tmp_path):
    rows, images = mixed_rows(tmp_path / "rows.jsonl", count=4)
    out = tmp_path / "out"
    batch(rows, out, model=str(cascade_dir), max_batch=2, ray=TWO, progress=False)
    first = by_image(out)
    damaged = out / first[(3, 0)]["file"]
    before = pixels(damaged)
    damaged.write_bytes(damaged.read_bytes()[:100])
    sheet = tmp_path / "sheet.png"
    summary = batch(rows, out, model=str(cascade_dir), max_batch=2, ray=RayOptions(autoscale=(1, 2)), progress=False,
                    sheet=sheet)  # an autoscaling pool this time
    assert summary.images_written == 1 and summary.images_skipped == images - 1
    assert Image.open(sheet).size[0] > 0  # --sheet: every image of the job, as without Ray
    again = by_image(out)
    assert {key: e["request"]["seed"] for key, e in again.items()} == \
        {key: e["request"]["seed"] for key, e in first.items()}  # redone with its seed
    assert all(again[key]["sha256"] == first[key]["sha256"] for key in first if key[0] != 3)  # the rest kept
    # Redone alone rather than in its first work item, its pixels may move by one level (CPU kernels' last
    # bits depend on the batch); another seed would move them everywhere.
    assert np.abs(pixels(out / first[(3, 0)]["file"]) - before).max() <= 1
    check_complete(out, images)


def test_bad_rows_are_reported_by_line_and_strict_stops(ray_cluster, cascade_dir, tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "a red circle", "steps": [2, 2], "seed": 1}\n'
                    '{"prompt": "a blue square", "steps": [2, 2], "n": 0}\n'  # refused before any work
                    '{"prompt": "a green circle", "steps": [2, 2], "preset": "nonexistent"}\n')  # by the model
    summary = batch(rows, tmp_path / "out", model=str(cascade_dir), ray=TWO, progress=False)
    assert summary.images_written == 1
    assert sorted(bad.line for bad in summary.bad_rows) == [2, 3]
    assert "nonexistent" in [bad.reason for bad in summary.bad_rows if bad.line == 3][0]
    with pytest.raises(InvalidRequestError, match="line 2"):
        batch(rows, tmp_path / "strict", model=str(cascade_dir), ray=TWO, strict=True, progress=False)
    rows.write_text('{"prompt": "a green circle", "steps": [2, 2], "preset": "nonexistent"}\n')
    with pytest.raises(EngineError, match="line 1: .*nonexistent"):
        batch(rows, tmp_path / "strict2", model=str(cascade_dir), ray=TWO, strict=True, progress=False)


def test_a_model_that_cannot_load_fails_the_job_with_its_own_error(ray_cluster, tmp_path):
    rows = tmp_path / "rows.txt"
    rows.write_text("a red circle\n")
    missing = tmp_path / "no-such-model"
    start = time.monotonic()
    with pytest.raises(EngineError, match="a batch worker failed: .*no-such-model"):
        batch(rows, tmp_path / "out", model=str(missing), ray=TWO, progress=False)
    assert time.monotonic() - start < 120  # at once, not after retries without end


def test_work_items_group_rows_by_settings_and_hold_at_most_max_batch_images():
    rows = [Row(1, {"prompt": "a", "steps": [2, 2]}), Row(2, {"prompt": "b", "steps": [3, 2], "n": 2}),
            Row(3, {"prompt": "c", "steps": [2, 2], "seed": 7}), Row(4, {"prompt": "d", "steps": [3, 2], "n": 5}),
            Row(5, {"prompt": "e", "steps": [2, 2], "image": "in.png", "strength": 0.5}, "/jobs"),
            Row(6, {"prompt": "f", "steps": [2, 2], "image": "other.png", "strength": 0.5}, "/jobs")]
    plan = Plan(rows, rows, {1: 11, 2: 12, 4: 14, 5: 15, 6: 16}, 0, 11)
    items = [json.loads(item["rows"]) for item in work_items(plan, None, max_batch=3)]
    # edits apart (their strength decides their steps), with the folder their pictures are in
    assert [[line for line, *_ in item] for item in items] == [[1, 3], [2], [4], [5, 6]]
    assert {line: seed for item in items for line, _, seed, _ in item} == {1: 11, 2: 12, 3: 7, 4: 14, 5: 15, 6: 16}
    assert items[-1][0][3] == "/jobs"


@pytest.mark.parametrize("options", [dict(workers=0), dict(workers=2, autoscale=(1, 2)), dict(autoscale=(3, 1)),
                                     dict(num_gpus=-1)])
def test_bad_ray_options_are_refused(options):
    with pytest.raises(InvalidRequestError):
        RayOptions(**options)


def test_the_cli_wants_ray_for_the_ray_flags(tmp_path, capsys):
    from engine.cli import main

    rows = tmp_path / "rows.txt"
    rows.write_text("a red circle\n")
    assert main(["batch", str(rows), "--out", str(tmp_path / "o"), "--workers", "2"]) != 0
    assert "add --ray" in capsys.readouterr().err
    assert main(["batch", str(rows), "--out", str(tmp_path / "o"), "--ray", "--autoscale", "2"]) != 0
    assert "MIN:MAX" in capsys.readouterr().err
