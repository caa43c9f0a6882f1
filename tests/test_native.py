"""The native kernel library (CMakeLists.txt): configured and built once per session into a temporary directory
with this interpreter, then loaded through cascade_kernels/native.py. CPU-only: the GPU check is ctest's
gpu_attention, which skips itself without a driver."""

from __future__ import annotations

import ast
import ctypes.util
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # as test_attention_kernel.py: whichever test module imports the kernel first
    os.environ.setdefault("TRITON_INTERPRET", "1")  # fixes its configs for the session

from cascade_kernels import native  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed: the native library cannot be built here")
    pytest.importorskip("triton", reason="the build compiles the kernels with Triton")
    build = tmp_path_factory.mktemp("cmake-build")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}"],
                ["cmake", "--build", str(build), "--parallel", str(os.cpu_count() or 2)]):
        run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
        assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return build / "libcascade_kernels.so"


@pytest.fixture(scope="session")
def lib(built) -> native.Library:
    return native.Library(built)


def test_metadata_names_the_cubins_architectures(lib):
    assert lib.architectures() == ["sm_80", "sm_90a"]  # Triton targets sm_90a for capability 9.0
    variants = lib.variants()
    assert {v.arch_name for v in variants} == {"sm_80", "sm_90a"}
    kinds = {(v.arch, v.dtype, v.head_dim, v.has_mask) for v in variants}
    for arch in (80, 90):  # what IF's U-Nets call: head dim 64, float16 or bfloat16, with or without a mask
        for dtype in (torch.float16, torch.bfloat16):
            assert {(arch, dtype, 64, False), (arch, dtype, 64, True)} <= kinds
    assert len(kinds) == len(variants), "two variants for one key"
    assert all(v.cubin_size > 1000 and v.shared_bytes > 0 and v.num_warps in (4, 8) for v in variants)
    assert lib.triton_version() == __import__("triton").__version__


def test_the_library_holds_this_checkout_s_kernel(lib):
    # The compiled (not interpreted) kernel's key, as the custom op compares it on a GPU: in a process of its own
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    key = subprocess.run([sys.executable, "-c", "from cascade_kernels.attention import _attention_kernel as k; "
                          "print(k.fn.cache_key)"], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    assert lib.kernel_key() == key.stdout.strip()


def test_coverage_by_compute_capability(lib):
    assert lib.covers(torch.float16, 64, False, (8, 0)) and lib.covers(torch.bfloat16, 64, True, (8, 9))
    assert lib.covers(torch.float16, 64, True, (9, 0))
    assert not lib.covers(torch.float16, 64, False, (7, 5))  # no cubin older than sm_80
    assert not lib.covers(torch.float16, 64, False, (10, 0))  # sm_90a cubins run on 9.0 only
    assert not lib.covers(torch.float32, 64, False, (9, 0))  # float32 stays on the JIT path
    assert not lib.covers(torch.float16, 40, False, (9, 0))


def test_the_library_never_links_libcuda(built):
    if shutil.which("readelf") is None:
        pytest.skip("readelf is not installed")
    dynamic = subprocess.run(["readelf", "-d", str(built)], capture_output=True, text=True, check=True).stdout
    assert "NEEDED" in dynamic and "libcuda" not in dynamic, dynamic


def test_driver_status_answers_here(lib):
    status, why = lib.driver_status()  # whatever this machine has: an answer, not a crash
    assert status in (native.OK, native.NO_DRIVER), (status, why)
    assert (status == native.OK) == (why == "")


def test_launch_without_a_driver_returns_the_error(built):
    # In a fresh process whose driver is a missing file (the driver loads once per process), so this holds on a
    # GPU machine too. The addresses are never dereferenced: without a driver nothing reaches a GPU.
    script = textwrap.dedent(f"""
        import torch
        from cascade_kernels import native
        lib = native.Library({str(built)!r})
        B, H, LQ, LK, D = 2, 3, 100, 177, 64
        q = (0x10000, (H * LQ * D, LQ * D, D, 1))
        kv = (0x20000, (H * LK * D, LK * D, D, 1))
        o = (0x40000, q[1])
        try:
            lib.launch(0, torch.float16, (B, H, LQ, LK, D), 0.125, q, kv, kv, o, None)
        except native.NativeError as e:
            print("RAISED", e)
        # coverage is answered before the driver is needed
        print("D40", lib.launch(0, torch.float16, (B, H, LQ, LK, 40), 0.125, q, kv, kv, o, None))
        print("STRIDE2", lib.launch(0, torch.float16, (B, H, LQ, LK, D), 0.125,
                                    (0x10000, (2 * H * LQ * D, 2 * LQ * D, 2 * D, 2)), kv, kv, o, None))
        print("STATUS", lib.driver_status()[0])
    """)
    env = dict(os.environ, CASCADE_KERNELS_LIBCUDA="/nonexistent/libcuda.so.1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, f"the process died ({run.returncode}):\n{run.stdout}\n{run.stderr}"
    lines = dict(line.split(" ", 1) for line in run.stdout.splitlines())
    assert lines["RAISED"].startswith("cascade_attention: no CUDA driver: cannot load /nonexistent/libcuda.so.1")
    assert lines["D40"] == str(native.NOT_COVERED) and lines["STRIDE2"] == str(native.NOT_COVERED)
    assert lines["STATUS"] == str(native.NO_DRIVER)


def test_a_file_that_is_not_the_library_is_refused(tmp_path):
    with pytest.raises(OSError):
        native.Library(tmp_path / "missing.so")
    with pytest.raises(OSError, match="has no cascade_abi_version"):
        native.Library(ctypes.util.find_library("c") or "libc.so.6")  # loads, but is not ours


def test_the_switch_and_the_default_path(monkeypatch):
    monkeypatch.setenv("CASCADE_KERNELS_NATIVE", "0")
    assert not native.enabled()
    monkeypatch.setenv("CASCADE_KERNELS_NATIVE", "1")
    assert native.enabled()
    monkeypatch.delenv("CASCADE_KERNELS_LIB", raising=False)
    assert native.library_path() == ROOT / "build" / "libcascade_kernels.so"
    monkeypatch.setenv("CASCADE_KERNELS_LIB", "/x/libcascade_kernels.so")
    assert native.library_path() == Path("/x/libcascade_kernels.so")


def test_cpu_tensors_go_to_the_jit_path(lib):
    q = torch.zeros(1, 1, 4, 64, dtype=torch.float16)
    assert lib.attention(q, q, q, 0.125) is None  # the custom op sends CPU calls to the JIT path anyway


def test_cascade_kernels_imports_no_engine():
    for path in (ROOT / "cascade_kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] == "engine" for n in names), f"{path.name} imports {names}"
