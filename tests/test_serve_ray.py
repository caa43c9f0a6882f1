"""The HTTP app as a Ray Serve deployment on a local Ray cluster: two replicas that load and warm up the model
in their constructors both serve (with the service's own auth), the deployment's readiness and Ray's metrics
export see both, and a deployment whose model cannot load is reported failed with the model's error."""

import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from engine.errors import EngineError  # noqa: E402
from engine.serve import ray_app  # noqa: E402
from engine.testing.ports import free_port  # noqa: E402

KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def ray_cluster():
    metrics_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, ignore_reinit_error=True, _metrics_export_port=metrics_port)
    try:
        yield metrics_port
    finally:
        serve.shutdown()
        ray.shutdown()


def _generate(url: str, seed: int) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", headers=HEADERS,
                      json={"prompt": "a red circle", "seed": seed, "steps": [2, 2]}, timeout=120)


def _image(response: httpx.Response) -> np.ndarray:
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def test_two_replicas_both_serve_and_report(ray_cluster, cascade_dir):
    port = free_port()
    app = ray_app.application({"device": "cpu"}, [str(cascade_dir)],
                              {"max_batch": 2, "max_queue": 4, "timeout_s": 120, "api_keys": [KEY]}, replicas=2)
    ray_app.run(app, "127.0.0.1", port, blocking=False)  # returns once both replicas are up: loaded and warm
    url = f"http://127.0.0.1:{port}"
    try:
        status = serve.status().applications[ray_app.DEPLOYMENT_NAME]
        assert status.status.value == "RUNNING"
        assert status.deployments[ray_app.DEPLOYMENT_NAME].replica_states == {"RUNNING": 2}

        ready = httpx.get(f"{url}/health/ready", timeout=30)
        assert ready.status_code == 200, ready.text
        assert ready.headers["x-replica-id"]

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda seed: _generate(url, seed), range(16)))
        assert [a.status_code for a in answers] == [200] * 16, answers[0].text
        replicas = {a.headers["x-replica-id"] for a in answers}
        assert len(replicas) == 2
        image = _image(answers[0])
        assert image.shape == (32, 32, 3)
        # The same seed alone, from whichever replica: the same picture (batching moves floats by ~1e-5, which
        # can flip a rounding to 8 bits).
        assert np.abs(_image(_generate(url, 0)) - image).max() <= 1

        unauthorized = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, timeout=30)
        assert unauthorized.status_code == 401  # --api-key holds under Ray as it does alone
        bad = httpx.post(f"{url}/v1/images/generations", headers=HEADERS, json={"seed": 1}, timeout=30)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"

        # Ray's metrics export on this node: every replica's counts, tagged with the replica.
        deadline, counted = time.monotonic() + 90, {}
        while time.monotonic() < deadline and sum(counted.values()) < 17:
            time.sleep(2)
            text = httpx.get(f"http://127.0.0.1:{ray_cluster}/metrics", timeout=10).text
            counted = {}
            for line in text.splitlines():
                if line.startswith("ray_engine_requests_total{") and 'status="ok"' in line:
                    replica = line.split('replica="', 1)[1].split('"', 1)[0]
                    counted[replica] = counted.get(replica, 0) + float(line.rsplit(" ", 1)[1])
        assert set(counted) == replicas
        assert sum(counted.values()) == 17
    finally:
        serve.delete(ray_app.DEPLOYMENT_NAME)


def test_a_model_that_cannot_load_fails_the_deployment(ray_cluster, tmp_path):
    missing = tmp_path / "no-such-model"
    app = ray_app.application({"device": "cpu"}, [str(missing)], {"max_batch": 2, "max_queue": 4}, replicas=2)
    try:
        with pytest.raises(EngineError, match="failed to start") as caught:
            ray_app.run(app, "127.0.0.1", free_port(), blocking=False)
        assert "no-such-model" in str(caught.value)  # the replicas' own error, through Ray
        status = serve.status().applications[ray_app.DEPLOYMENT_NAME]
        assert status.status.value == "DEPLOY_FAILED"
    finally:
        serve.delete(ray_app.DEPLOYMENT_NAME)


def test_bad_ray_options_are_refused():
    with pytest.raises(Exception, match="replicas must be >= 1"):
        ray_app.application({}, ["shapes"], {}, replicas=0)
    with pytest.raises(Exception, match="1 <= MIN <= MAX"):
        ray_app.application({}, ["shapes"], {}, autoscale=(3, 1))
