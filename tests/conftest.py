"""Shared fixtures: a tiny random IF-architecture cascade on disk, our pipeline and diffusers' over it.

No test touches the network: every socket connection to an address other than loopback or this machine's own
fails (the guard below), so a code path that would reach the Hugging Face Hub fails its test instead.
"""

from __future__ import annotations

import ipaddress
import shutil
import socket

import pytest


def _local_addresses() -> set[str]:
    names = {"localhost", socket.gethostname()}
    addresses = set()
    for name in names:
        try:
            addresses |= {info[4][0] for info in socket.getaddrinfo(name, None)}
        except OSError:
            pass
    return addresses


LOCAL_ADDRESSES = _local_addresses()
_connect, _connect_ex = socket.socket.connect, socket.socket.connect_ex


def _allowed(address) -> bool:
    if not isinstance(address, tuple):  # a Unix socket path
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback or host in LOCAL_ADDRESSES
    except ValueError:  # a host name: only this machine's own
        return host in ("localhost", socket.gethostname())


def _guarded_connect(self, address):
    if not _allowed(address):
        raise ConnectionRefusedError(f"tests must not use the network: connection to {address!r} refused")
    return _connect(self, address)


def _guarded_connect_ex(self, address):
    if not _allowed(address):
        raise ConnectionRefusedError(f"tests must not use the network: connection to {address!r} refused")
    return _connect_ex(self, address)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex

from engine.testing.random_models import TinyCascadeSpec, write_if_cascade, write_three_stage_cascade
from engine.testing.reference import reference_cascade, run_reference, swap_scheduler


@pytest.fixture(scope="session")
def cascade_dir(tmp_path_factory):
    """A two-stage tiny IF cascade (16px base -> 32px super-resolution) with cascade.json."""
    return write_if_cascade(tmp_path_factory.mktemp("cascade"), TinyCascadeSpec(), seed=0)


@pytest.fixture(scope="session")
def engine_pipe(cascade_dir):
    import engine

    return engine.load(cascade_dir, device="cpu")


@pytest.fixture(scope="module")
def fast_pipe(cascade_dir):
    """The tiny cascade on the fast path, its U-Nets left uncompiled (tests/test_fast.py compiles them once)."""
    import engine

    pipe = engine.load(cascade_dir, fast=True)
    for stage in pipe.stages:
        stage.unet.compile = False
    return pipe


@pytest.fixture(scope="session")
def reference(cascade_dir):
    """diffusers' IF pipelines over the same files: the oracle every parity test compares against."""
    return reference_cascade(cascade_dir)


def scheduled(pipe, requests, **options) -> list:
    """Each request's images through one step-level scheduler (BatchingScheduler(pipe, **options)), all submitted
    at once and stepped by hand to the end: their U-Net calls shared as the scheduler batches them."""
    from engine.serve import BatchingScheduler

    scheduler = BatchingScheduler(pipe, **options)
    futures = [scheduler.submit(request) for request in requests]
    while scheduler.step():
        pass
    return [future.result(timeout=0).images for future in futures]


def diffusers_cascade(reference, prompts, seed, steps, guidance, n=1, negative=None, noise_level=250,
                      scheduler_cls=None):
    """The reference cascade's np images (B, H, W, 3), optionally with another scheduler class."""
    first, second = reference
    saved = first.scheduler, second.scheduler
    if scheduler_cls is not None:
        first.scheduler, second.scheduler = (swap_scheduler(s, scheduler_cls) for s in saved)
    try:
        return run_reference(reference, prompts, seed, steps, guidance, n=n, negative=negative,
                             noise_level=noise_level)
    finally:
        first.scheduler, second.scheduler = saved


@pytest.fixture(scope="session")
def three_stage_dir(tmp_path_factory):
    """IF-I (16px) -> IF-II (32px) -> x4 upscaler (32px latents -> 128px), random, with cascade.json."""
    return write_three_stage_cascade(tmp_path_factory.mktemp("cascade3"))


@pytest.fixture(scope="session")
def three_stage_pipe(three_stage_dir):
    import engine

    return engine.load(three_stage_dir, device="cpu")


@pytest.fixture
def cascade_copy(cascade_dir, tmp_path):
    """A copy of the two-stage cascade that a test may damage."""
    return shutil.copytree(cascade_dir, tmp_path / "cascade")


@pytest.fixture
def three_stage_copy(three_stage_dir, tmp_path):
    """A copy of the three-stage cascade that a test may damage."""
    return shutil.copytree(three_stage_dir, tmp_path / "cascade3")
