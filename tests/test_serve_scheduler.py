"""The step-level batching scheduler: same images batched or alone, admission at step boundaries, bounded
queue, cancellation, deadlines, and one request's NaN failing that request only."""

import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from engine import GenerateRequest, InvalidRequestError, NumericalError
from engine.errors import QueueFullError, RequestTimeoutError
from engine.serve import BatchingScheduler

STEPS = (4, 3)


def request(seed, **options):
    return GenerateRequest(options.pop("prompt", "a red circle"), seed=seed, steps=options.pop("steps", STEPS),
                           output_type="np", **options)


def drain(scheduler, limit=200):
    for _ in range(limit):
        if not scheduler.step():
            return
    raise AssertionError("the scheduler did not run dry")


def test_requests_joining_mid_stage_get_the_images_they_get_alone(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe, max_batch=8)
    requests = [request(1), request(2, prompt=["a blue square", "a cat"], guidance=(5.0, 1.0)),
                request(3, steps=(3, 2), noise_level=100, num_images_per_prompt=2),
                request(4, guidance=1.0, scheduler="ddim")]
    futures = [scheduler.submit(requests[0])]
    scheduler.step()
    scheduler.step()
    futures.append(scheduler.submit(requests[1]))
    scheduler.step()
    assert scheduler.active(0) == [0, 1]  # the second joined the first's running batch at a step boundary
    futures += [scheduler.submit(r) for r in requests[2:]]
    drain(scheduler)
    for future, req in zip(futures, requests):
        batched = future.result(timeout=0).images
        alone = engine_pipe.run(req).images
        assert batched.shape == alone.shape
        assert np.abs(batched - alone).max() <= 1e-4
        assert set(future.result().timings) == {"text", "stage_I", "stage_II"}


def test_max_batch_bounds_each_call_and_stages_run_side_by_side(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe, max_batch=2)
    calls = []
    scheduler.on_batch = lambda stage, images, rows: calls.append((stage, images, rows))
    futures = [scheduler.submit(request(seed)) for seed in range(3)]
    drain(scheduler)
    assert all(f.result(timeout=0) for f in futures)
    assert max(images for _, images, _ in calls) == 2
    assert all(rows == 2 * images for _, images, rows in calls)  # guided: two rows per image
    stages_per_step = {stage for stage, _, _ in calls}
    assert stages_per_step == {"stage_I", "stage_II"}
    # The third request entered stage I while the first two were in stage II: fewer calls than running apart.
    assert len(calls) < 3 * sum(STEPS)


def test_each_step_calls_the_fullest_stage_and_the_later_one_on_a_tie(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe, max_batch=2)
    calls = []
    scheduler.on_batch = lambda stage, images, rows: calls.append((stage, images))
    futures = [scheduler.submit(request(seed)) for seed in range(3)]
    drain(scheduler)
    assert all(f.result(timeout=0) for f in futures)
    first, later = STEPS
    # Requests 0 and 1 fill stage I; when they move on, request 2 enters stage I alone, and stage II (2 images)
    # runs to the end before stage I (1 image) is called again; then request 2 goes through stage II.
    assert calls == ([("stage_I", 2)] * first + [("stage_II", 2)] * later
                     + [("stage_I", 1)] * first + [("stage_II", 1)] * later)


def test_a_full_queue_refuses_at_once_and_accepts_again_after(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe, max_batch=1, max_queue=1)
    first = scheduler.submit(request(0))
    with pytest.raises(QueueFullError, match="queue is full"):
        scheduler.submit(request(1))
    scheduler.step()  # admits the first: a queue slot frees up
    second = scheduler.submit(request(1))
    drain(scheduler)
    assert first.result(timeout=0) and second.result(timeout=0)


def test_cancelled_request_leaves_at_the_next_step_and_the_others_finish(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe)
    keep, drop = scheduler.submit(request(0)), scheduler.submit(request(1))
    scheduler.step()
    assert drop.cancel()
    scheduler.step()
    assert scheduler.active(0) == [0]
    drain(scheduler)
    with pytest.raises(CancelledError):
        drop.result(timeout=0)
    assert np.abs(keep.result(timeout=0).images - engine_pipe.run(request(0)).images).max() <= 1e-4


def test_deadline_fails_that_request_only(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe)
    slow = scheduler.submit(request(0), timeout_s=0.05)
    other = scheduler.submit(request(1))
    scheduler.step()
    time.sleep(0.06)
    drain(scheduler)
    with pytest.raises(RequestTimeoutError, match="deadline"):
        slow.result(timeout=0)
    size = engine_pipe.image_size
    assert other.result(timeout=0).images.shape == (1, size, size, 3)


def test_overflow_in_one_request_fails_it_alone(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe)
    # Guidance 1e30 under DDIM overflows to inf in stage I; its rows share U-Net calls with the healthy one.
    broken = scheduler.submit(request(0, guidance=(1e30, 4.0), scheduler="ddim"))
    healthy = scheduler.submit(request(1))
    drain(scheduler)
    with pytest.raises(NumericalError, match="stage_I produced NaN or inf"):
        broken.result(timeout=0)
    assert np.abs(healthy.result(timeout=0).images - engine_pipe.run(request(1)).images).max() <= 1e-4


def test_bad_requests_are_refused_at_submit(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe)
    with pytest.raises(InvalidRequestError, match="strength 0.05 of stage_I's 10 steps runs none"):
        scheduler.submit(GenerateRequest("a cat", image=np.zeros((8, 8, 3)), strength=0.05, steps=10))
    with pytest.raises(InvalidRequestError, match="timeout_s must be > 0"):
        scheduler.submit(request(0), timeout_s=0)
    with pytest.raises(InvalidRequestError, match="max_batch and max_queue"):
        BatchingScheduler(engine_pipe, max_batch=0)
    small = BatchingScheduler(engine_pipe, max_batch=3)
    with pytest.raises(InvalidRequestError, match=r"asks for 4 images .*\(max_batch 3\)"):
        small.submit(request(0, prompt=["a cat", "a dog"], num_images_per_prompt=2))
    assert scheduler.queue_depth == 0 and small.queue_depth == 0
    small.submit(request(0, num_images_per_prompt=3))  # max_batch itself is fine: it waits in the queue
    assert small.queue_depth == 1


def test_background_thread_serves_concurrent_requests(engine_pipe):
    scheduler = BatchingScheduler(engine_pipe)
    scheduler.start()
    try:
        futures = [scheduler.submit(request(seed, steps=(2, 2))) for seed in range(3)]
        results = [f.result(timeout=120).images for f in futures]
    finally:
        scheduler.stop()
    size = engine_pipe.image_size
    assert all(r.shape == (1, size, size, 3) for r in results)
    assert not np.allclose(results[0], results[1])  # each request its own seed


@pytest.mark.parametrize("policy", ["request", "none"])
def test_the_comparison_policies_admit_only_when_idle(engine_pipe, policy):
    scheduler = BatchingScheduler(engine_pipe, max_batch=4, policy=policy)
    futures = [scheduler.submit(request(0)), scheduler.submit(request(1))]
    scheduler.step()
    first_batch = scheduler.active(0)
    assert first_batch == ([0, 1] if policy == "request" else [0])
    late = scheduler.submit(request(2))
    scheduler.step()
    assert 2 not in scheduler.active(0)  # no joining a running batch
    drain(scheduler)
    for future, seed in zip(futures + [late], range(3)):
        assert np.abs(future.result(timeout=0).images - engine_pipe.run(request(seed)).images).max() <= 1e-4
    with pytest.raises(InvalidRequestError, match="unknown batching policy"):
        BatchingScheduler(engine_pipe, policy="greedy")


def test_an_unexpected_failure_fails_the_running_jobs_and_the_loop_goes_on(engine_pipe):
    # Fault injection: stage I's U-Net raises once (as an out-of-memory would); the scheduler is under test.
    from engine import EngineError

    stage = engine_pipe.stages[0]
    real_unet = stage.unet
    failures = []

    def failing_once(*args):
        if not failures:
            failures.append(1)
            raise RuntimeError("CUDA out of memory (injected)")
        return real_unet(*args)

    scheduler = BatchingScheduler(engine_pipe)
    stage.unet = failing_once
    try:
        scheduler.start()
        hit = scheduler.submit(request(0))
        with pytest.raises(EngineError, match="failed in the scheduler: RuntimeError: CUDA out of memory"):
            hit.result(timeout=60)
        after = scheduler.submit(request(1))
        assert np.abs(after.result(timeout=60).images - engine_pipe.run(request(1)).images).max() <= 1e-4
    finally:
        scheduler.stop()
        stage.unet = real_unet


POISON = "a poisoned prompt"


@pytest.mark.parametrize("where", ["admission", "unet", "sampler"])
def test_a_failure_in_one_request_fails_it_alone(engine_pipe, monkeypatch, where):
    """Fault injection, one request at a time, with others in flight: only the poisoned one fails."""
    from engine import EngineError
    from engine.stage import StageRun

    poison = engine_pipe.text.encode([POISON])  # (1, 77, D): its rows in a U-Net call
    if where == "admission":
        real = engine_pipe.conditioning

        def conditioning(req, settings):
            if req.prompts == [POISON]:
                raise TypeError("the tokenizer choked (injected)")
            return real(req, settings)
        monkeypatch.setattr(engine_pipe, "conditioning", conditioning)
    elif where == "unet":
        for stage in engine_pipe.stages:
            real_unet = stage.unet

            def unet(sample, timestep, embeddings, labels, real_unet=real_unet):
                if (embeddings == poison).flatten(1).all(1).any():
                    raise RuntimeError("the U-Net failed on these rows (injected)")
                return real_unet(sample, timestep, embeddings, labels)
            monkeypatch.setattr(stage, "unet", unet)
    else:
        real_advance = StageRun.advance

        def advance(run, out):
            if run.settings.guidance == 6.5:
                raise FloatingPointError("the sampler failed (injected)")
            return real_advance(run, out)
        monkeypatch.setattr(StageRun, "advance", advance)
    scheduler = BatchingScheduler(engine_pipe)
    before = scheduler.submit(request(1))
    scheduler.step()
    bad = scheduler.submit(request(0, prompt=POISON, guidance=6.5 if where == "sampler" else 7.0))
    after = scheduler.submit(request(2))
    drain(scheduler)
    with pytest.raises(EngineError, match="injected"):
        bad.result(timeout=0)
    monkeypatch.undo()
    for future, seed in ((before, 1), (after, 2)):
        assert np.abs(future.result(timeout=0).images - engine_pipe.run(request(seed)).images).max() <= 1e-4
