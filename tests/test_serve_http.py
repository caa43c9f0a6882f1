"""The HTTP service over the scheduler: the OpenAI-style endpoint, health, metrics, and its failure answers
(400, 503 with Retry-After, 504, 500 for one request's NaN, a disconnect freeing the slot), each followed by
a request that still succeeds."""

import base64
import io
import json
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("httpx")

from starlette.testclient import TestClient  # noqa: E402

from engine import GenerateRequest  # noqa: E402
from engine.errors import InvalidRequestError  # noqa: E402
from engine.serve.defaults import Limits  # noqa: E402
from engine.serve.http import create_app  # noqa: E402
from engine.testing.ports import free_port, serving  # noqa: E402

BODY = {"prompt": "a red circle", "seed": 3, "steps": [3, 2]}


def wait_ready(client, limit_s=60):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if client.get("/health/ready").status_code == 200:
            return
        time.sleep(0.05)
    raise AssertionError("the service never became ready")


@pytest.fixture(scope="module")
def client(engine_pipe):
    with TestClient(create_app(engine_pipe, max_batch=4, max_queue=8, timeout_s=60)) as client:
        wait_ready(client)
        yield client


def pngs(response):
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in response.json()["data"]]


def test_generation_returns_the_engines_pngs(client, engine_pipe):
    response = client.post("/v1/images/generations", json={**BODY, "n": 2, "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert response.json()["seed"] == 3
    images = pngs(response)
    expected = engine_pipe.generate("a red circle", seed=3, steps=(3, 2), num_images_per_prompt=2)
    assert len(images) == 2
    for got, want in zip(images, expected):
        # PNG is lossless: at most one 8-bit step from batching's float rounding.
        assert np.abs(got.astype(int) - np.asarray(want).astype(int)).max() <= 1


@pytest.mark.parametrize("body, message", [
    ({"seed": 1}, "prompt is required"),
    ({**BODY, "n": 0}, "n must be >= 1"),  # the API's name, not the core's num_images_per_prompt
    ({**BODY, "n": 5}, "asks for 5 images"),  # more than the app's max_batch (4) in one request
    ({**BODY, "steps": [3, 2, 1]}, "steps has 3 values"),
    ({**BODY, "response_format": "url"}, "response_format must be 'b64_json'"),
    ({**BODY, "size": "1024x1024"}, "size must be '32x32'"),
    ({**BODY, "colour": "red"}, "unknown field"),
    ({**BODY, "timeout": -1}, "timeout must be"),
    (["a list"], "must be a JSON object"),
])
def test_bad_input_is_a_400_naming_the_problem(client, body, message):
    response = client.post("/v1/images/generations", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_invalid_json_is_a_400(client):
    response = client.post("/v1/images/generations", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_timeout_is_a_504_and_the_service_goes_on(client):
    response = client.post("/v1/images/generations", json={**BODY, "steps": [50, 50], "timeout": 0.01})
    assert response.status_code == 504 and "deadline" in response.json()["error"]["message"]
    assert response.headers["x-should-retry"] == "false"  # the OpenAI SDKs would resend it otherwise
    assert client.post("/v1/images/generations", json=BODY).status_code == 200


def test_nan_in_one_request_is_a_500_for_it_alone(client, engine_pipe, monkeypatch):
    # Fault injection: stage I's U-Net gives NaN for one prompt's rows (as a float16 overflow would).
    poison = engine_pipe.text.encode(["a poisoned prompt"])
    real_unet = engine_pipe.stages[0].unet

    def unet(sample, timestep, embeddings, labels=None):
        out = real_unet(sample, timestep, embeddings, labels)
        rows = (embeddings == poison).flatten(1).all(1)
        return out.masked_fill(rows[:, None, None, None], float("nan"))
    monkeypatch.setattr(engine_pipe.stages[0], "unet", unet)
    response = client.post("/v1/images/generations", json={**BODY, "prompt": "a poisoned prompt"})
    assert response.status_code == 500 and "NaN or inf" in response.json()["error"]["message"]
    assert client.post("/v1/images/generations", json=BODY).status_code == 200


NASTY = {  # body -> (status, what the message says)
    b'{"prompt": "\\ud800"}': (400, "not valid Unicode"),  # a lone surrogate: JSON allows it, the tokenizer does not
    b'{"prompt": "a\\u0000b"}': (400, "control character U+0000"),
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}": (400, "nested too deeply"),
    b'{"prompt": "a", "steps": ' + b"[" * 20 + b"3" + b"]" * 20 + b"}": (400, "nested more than"),
    b'{"prompt": "a", "guidance": 1e40}': (400, "guidance must be in 0..50"),
    b'{"prompt": "a", "guidance": NaN}': (400, "guidance must be in 0..50"),
    b'{"prompt": "a", "seed": 1e400}': (400, "seed has the wrong type"),
    b'{"prompt": "' + b"x" * 5000 + b'"}': (400, "prompt is 5000 characters"),
    b'{"prompt": "' + b"x" * (2 << 20) + b'"}': (413, "the body is over"),
    b"\xff\xfe{not utf-8}": (400, "not valid JSON"),
    b'{"prompt": 3, "n": "two", "steps": {}}': (400, ""),
}


def test_nasty_bodies_get_a_4xx_at_once_and_a_request_in_flight_still_succeeds(client):
    import psutil

    in_flight = {}
    thread = threading.Thread(target=lambda: in_flight.update(
        response=client.post("/v1/images/generations", json={**BODY, "steps": [12, 12]})))
    thread.start()
    try:
        for body, (status, message) in NASTY.items():
            start = time.monotonic()
            response = client.post("/v1/images/generations", content=body,
                                   headers={"content-type": "application/json"})
            assert time.monotonic() - start < 1.0, body[:40]
            assert response.status_code == status, (body[:40], response.text[:200])
            assert message in response.json()["error"]["message"], (body[:40], response.text[:200])
    finally:
        thread.join()
    assert in_flight["response"].status_code == 200
    # Refused bodies leave nothing behind: the service's memory (this process) does not grow over more rounds.
    rss = psutil.Process().memory_info().rss
    for _ in range(5):
        for body in NASTY:
            client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
    assert psutil.Process().memory_info().rss - rss < 64 * 2**20


def test_the_request_id_is_echoed_or_made(client):
    assert client.post("/v1/images/generations", json=BODY, headers={"X-Request-ID": "abc-1"}
                       ).headers["X-Request-ID"] == "abc-1"
    made = client.post("/v1/images/generations", json={"seed": 1}).headers["X-Request-ID"]
    assert len(made) == 32  # a fresh id, on an error too


def test_health_and_metrics(client):
    assert client.get("/health/live").json() == {"status": "live"}
    assert client.get("/health/ready").status_code == 200
    client.post("/v1/images/generations", json=BODY)
    text = client.get("/metrics").text
    assert 'engine_requests_total{status="ok"}' in text
    assert "engine_queue_depth 0" in text
    assert "engine_batch_images_bucket" in text and "engine_compute_seconds_count" in text
    ok = [line for line in text.splitlines() if line.startswith('engine_requests_total{status="ok"}')]
    assert float(ok[0].split()[-1]) >= 1
    assert 'engine_build_info{torch=' in text and "process_resident_memory_bytes" in text


def test_full_queue_is_a_503_with_retry_after(engine_pipe):
    app = create_app(engine_pipe, max_batch=1, max_queue=1, warmup=False, run_scheduler=False)
    with TestClient(app) as client:
        wait_ready(client)
        scheduler = app.state.service.scheduler
        waiting = scheduler.submit(GenerateRequest("a cat", steps=(2, 2)))  # fills the queue: nothing runs yet
        response = client.post("/v1/images/generations", json=BODY)
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        scheduler.start()
        assert waiting.result(timeout=60)
        assert client.post("/v1/images/generations", json=BODY).status_code == 200
        assert 'engine_requests_total{status="rejected"} 1' in client.get("/metrics").text


def test_not_ready_while_loading():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        raise RuntimeError("weights missing")

    with TestClient(create_app(slow_load)) as client:
        assert client.get("/health/live").status_code == 200
        assert client.get("/health/ready").status_code == 503
        assert client.post("/v1/images/generations", json=BODY).status_code == 503
        release.set()
        time.sleep(0.2)
        response = client.get("/health/ready")
        assert response.status_code == 503 and "weights missing" in response.json()["error"]["message"]
        # Liveness fails too, so an orchestrator restarts the pod instead of waiting on it forever.
        for path in ("/health/live", "/v2/health/live", "/v2/health/ready"):
            assert client.get(path).status_code == 503, path


def test_a_stopped_scheduler_fails_liveness_and_a_readiness_hook_holds_readiness(engine_pipe):
    reasons = ["the deployment is DEPLOYING: 1 of 2 replicas", None]
    app = create_app(engine_pipe, warmup=False, readiness=lambda: reasons[0])
    with TestClient(app) as client:  # a loaded Pipeline: ready as soon as the app has started
        response = client.get("/health/ready")
        assert response.status_code == 503 and "DEPLOYING" in response.json()["error"]["message"]
        reasons.pop(0)
        assert client.get("/health/ready").status_code == 200
        assert client.get("/health/live").status_code == 200
        app.state.service.scheduler.stop()  # what a broken scheduler loop leaves: no thread to run requests
        for path in ("/health/live", "/health/ready"):
            response = client.get(path)
            assert response.status_code == 503 and "scheduler has stopped" in response.json()["error"]["message"]


def wait_until_ready(url: str, seconds: float) -> None:
    """Poll url's /health/ready until it answers 200 (a server starting in a thread or a subprocess)."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} was not ready within {seconds:g} s")


def test_a_client_that_disconnects_cancels_its_request(engine_pipe):
    import httpx
    import uvicorn

    app = create_app(engine_pipe, max_batch=1, max_queue=4, warmup=False, limits=Limits(max_steps=200))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until_ready(f"http://127.0.0.1:{port}", 30)
        body = json.dumps({**BODY, "steps": [200, 200]}).encode()  # long enough to be cut short
        with socket.create_connection(("127.0.0.1", port)) as conn:
            conn.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            scheduler = app.state.service.scheduler
            running_by = time.monotonic() + 30
            while not scheduler.active(0):
                assert time.monotonic() < running_by, conn.recv(4096)  # refused: the answer says why
                time.sleep(0.01)
        # The socket is closed: the handler cancels, the scheduler drops the job at a step boundary.
        deadline = time.monotonic() + 30
        metrics = ""
        while time.monotonic() < deadline and 'status="cancelled"' not in metrics:
            time.sleep(0.05)
            metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'engine_requests_total{status="cancelled"} 1' in metrics
        assert not scheduler.active(0) and not scheduler.active(1)  # the slot is free
        response = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json=BODY, timeout=60)
        assert response.status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)


def test_errors_take_openais_shape_and_its_optional_fields_are_accepted(client):
    error = client.post("/v1/images/generations", json={**BODY, "n": 0}).json()["error"]
    assert error == {"message": "n must be >= 1, got 0", "type": "invalid_request_error", "param": "n",
                     "code": "invalid_request"}
    ignored = {"user": "u1", "quality": "hd", "style": "vivid", "output_format": "png", "background": "auto",
               "moderation": "low"}
    assert client.post("/v1/images/generations", json={**BODY, **ignored}).status_code == 200
    response = client.post("/v1/images/generations", json={**BODY, "output_format": "jpeg"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "output_format"


def test_api_keys_guard_generation_and_metrics(engine_pipe):
    app = create_app(engine_pipe, warmup=False, api_keys=["k-one", "k-two"])
    with TestClient(app) as client:
        wait_ready(client)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic k-one"}):
            response = client.post("/v1/images/generations", json=BODY, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["type"] == "authentication_error"
        assert client.get("/metrics").status_code == 401
        assert client.get("/health/ready").status_code == 200  # health stays open
        good = {"Authorization": "Bearer k-two"}
        assert client.post("/v1/images/generations", json=BODY, headers=good).status_code == 200
        assert 'engine_requests_total{status="unauthorized"} 3' in client.get("/metrics", headers=good).text


def test_sigterm_drains_readiness_first_then_the_requests_in_flight(cascade_dir):
    import os
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--model", str(cascade_dir), "--port",
                               str(port), "--device", "cpu", "--drain-timeout", "1", "--log-level", "warning",
                               "--max-steps", "1000"],
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, 120)
        answers = {}
        long = threading.Thread(target=lambda: answers.update(long=httpx.post(
            f"{url}/v1/images/generations", json={**BODY, "steps": [1000, 1000]}, timeout=60)))
        long.start()
        time.sleep(1.0)  # it is running
        server.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(f"{url}/health/ready")  # the listener is still open: readiness says it is going
        assert ready.status_code == 503 and ready.json()["error"]["code"] == "draining"
        assert httpx.post(f"{url}/v1/images/generations", json=BODY).status_code == 503
        long.join(30)
        assert answers["long"].status_code == 503 and "drain ran out" in answers["long"].json()["error"]["message"]
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()


def test_slow_and_silent_clients_get_a_408_and_lose_their_connection(engine_pipe):
    import uvicorn

    import httpx

    from engine.serve.defaults import Limits
    from engine.serve.http import header_timeout_protocol

    port = free_port()
    app = create_app(engine_pipe, warmup=False, limits=Limits(body_timeout_s=1.0))
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning",
                                           http=header_timeout_protocol(1.0), timeout_keep_alive=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        slow = []
        for k in range(40):  # half send part of their headers, half nothing at all
            sock = socket.create_connection(("127.0.0.1", port))
            if k % 2:
                sock.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(5)
            slow.append(sock)
        dripper = socket.create_connection(("127.0.0.1", port))  # whole headers, then 10 of 100 body bytes
        dripper.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 100\r\n\r\n{\"prompt\":")
        dripper.settimeout(5)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:  # one keep-alive connection
            assert client.get("/health/live").status_code == 200  # served while they hang
            time.sleep(1.5)
            assert client.get("/health/live").status_code == 200  # whole headers each time: kept alive
        started = time.monotonic()
        for sock in slow:
            answer = b""
            while chunk := sock.recv(1024):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408"), answer
            sock.close()
        assert time.monotonic() - started < 3  # closed by the server, not by our 5 s socket timeout
        answer = dripper.recv(4096)
        assert answer.startswith(b"HTTP/1.1 408") and b"did not arrive within 1 s" in answer, answer
        dripper.close()
    finally:
        server.should_exit = True
        thread.join(10)


def test_openapi_describes_the_api(client):
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/v1/images/generations"]["post"]
    body = operation["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "n", "steps", "guidance", "seed", "quality"} <= set(body["properties"])
    assert {"200", "400", "401", "503", "504"} <= set(operation["responses"])
    assert {"/health/live", "/v2/health/ready", "/metrics"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_the_openai_sdk_sees_openai_shaped_answers(engine_pipe):
    openai = pytest.importorskip("openai")

    app = create_app(engine_pipe, max_batch=2, max_queue=1, warmup=False)
    with serving(app) as url:
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        result = sdk.images.generate(prompt="a red circle", n=1, response_format="b64_json", quality="hd",
                                     extra_body={"seed": 3, "steps": [2, 2]})
        assert result.data[0].b64_json and result.model_extra["seed"] == 3
        with pytest.raises(openai.BadRequestError) as info:
            sdk.images.generate(prompt="a red circle", n=0)
        assert info.value.param == "n" and "n must be >= 1" in info.value.message
        served = Path(engine_pipe.source).name  # the folder's name: clients do not see the path
        assert [model.id for model in sdk.models.list()] == [served] and sdk.models.retrieve(served).id == served
        with pytest.raises(openai.NotFoundError) as info:
            sdk.images.generate(prompt="a red circle", model="dall-e-3")
        assert info.value.code == "model_not_found" and repr(served) in info.value.message
        assert sdk.images.generate(prompt="a red circle", model=served, extra_body={"steps": [2, 2]}).data
        app.state.service.draining.set()  # as after SIGTERM
        with pytest.raises(openai.InternalServerError) as info:
            sdk.images.generate(prompt="a red circle")
        assert info.value.status_code == 503 and "shutting down" in info.value.message


def test_a_requests_cost_is_bounded_by_limits_that_fit_the_model(engine_pipe, monkeypatch):
    with TestClient(create_app(engine_pipe, max_batch=4, warmup=False, model_name="tiny")) as client:
        wait_ready(client)
        limits = client.get("/v1/limits").json()["limits"]
        size = engine_pipe.image_size
        assert limits["max_images"] == 4 and limits["max_pixels_per_request"] == 4 * size * size
        assert limits["max_steps"] >= 100  # 4x the model's default steps, at least 100
        response = client.post("/v1/images/generations", json={**BODY, "steps": [2, limits["max_steps"] + 1]})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "steps"
        assert f"at most {limits['max_steps']} per stage (--max-steps)" in error["message"]
        assert "stage_II" in error["message"]
        response = client.post("/v1/images/generations", json={**BODY, "n": 5})
        assert response.status_code == 400
        assert "at most 4 per request (--max-images)" in response.json()["error"]["message"]
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
        assert client.get("/v1/models/tiny").json()["id"] == "tiny"
        response = client.get("/v1/models/dall-e-3")
        assert response.status_code == 404 and "serves 'tiny'" in response.json()["error"]["message"]
        response = client.post("/v1/images/generations", json={**BODY, "model": "dall-e-3"})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
        assert client.post("/v1/images/generations", json={**BODY, "model": "tiny"}).status_code == 200
    small = Limits(max_pixels_per_request=2 * size * size)
    with TestClient(create_app(engine_pipe, max_batch=4, warmup=False, limits=small)) as client:
        wait_ready(client)
        response = client.post("/v1/images/generations", json={**BODY, "n": 3})
        error = response.json()["error"]
        assert response.status_code == 400 and error["param"] == "n" and "--max-pixels-per-request" in error["message"]
        assert client.post("/v1/images/generations", json={**BODY, "n": 2}).status_code == 200
    with pytest.raises(InvalidRequestError, match="max_images .5. cannot exceed max_batch .4."):
        create_app(engine_pipe, max_batch=4, warmup=False, limits=Limits(max_images=5))
    monkeypatch.setenv("CASCADE_ENGINE_MAX_STEPS", "12")
    assert Limits.from_environment().max_steps == 12
    monkeypatch.setenv("CASCADE_ENGINE_MAX_IMAGES", "many")
    with pytest.raises(InvalidRequestError, match="CASCADE_ENGINE_MAX_IMAGES must be a positive int"):
        Limits.from_environment()


def test_metrics_parse_and_count_what_clients_were_answered(engine_pipe):
    from prometheus_client.parser import text_string_to_metric_families

    with TestClient(create_app(engine_pipe, warmup=False)) as client:
        wait_ready(client)
        statuses = [client.post("/v1/images/generations", content=body, headers={"content-type": "application/json"})
                    .status_code for body in (json.dumps(BODY), json.dumps({**BODY, "n": 0}),
                                              b'{"prompt": "\\ud800"}', json.dumps(BODY))]
        client.post("/v1/images/generations", content=b"{", headers={"content-type": "application/json"})
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    counts = {s.labels["status"]: s.value for s in families["engine_requests"].samples
              if s.name == "engine_requests_total"}
    assert statuses == [200, 400, 400, 200]
    assert counts == {"ok": 2, "invalid": 3}

