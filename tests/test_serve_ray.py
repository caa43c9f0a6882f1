"""The HTTP app as a Ray Serve deployment on a local Ray cluster: a replica loads the packaged model and
answers a generation request with a PNG."""

import base64
import io
import time

import pytest
from PIL import Image

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

from engine.serve import ray_app  # noqa: E402
from engine.testing.ports import free_port  # noqa: E402



def test_ray_serve_deployment_answers_with_a_png(cascade_dir):
    port = free_port()
    app = ray_app.application({"device": "cpu"}, [str(cascade_dir)], max_batch=2, max_queue=4, timeout_s=120,
                              policy="step")
    try:
        ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
        ray_app.run(app, "127.0.0.1", port, blocking=False)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        response = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "seed": 1,
                                                                    "steps": [2, 2]}, timeout=120)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.size == (32, 32)
        assert httpx.post(f"{url}/v1/images/generations", json={"seed": 1}, timeout=30).status_code == 400
    finally:
        serve.shutdown()
        ray.shutdown()


def test_bad_ray_options_are_refused():
    with pytest.raises(Exception, match="replicas must be >= 1"):
        ray_app.application({}, ["shapes"], 2, 4, 60, "step", replicas=0)
    with pytest.raises(Exception, match="1 <= MIN <= MAX"):
        ray_app.application({}, ["shapes"], 2, 4, 60, "step", autoscale=(3, 1))
