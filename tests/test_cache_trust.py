"""The caches trust nothing they did not write (issue 42, item 6): the compiled-package cache and the ONNX/TensorRT
export cache. Other users are simulated by chown'ing to another uid, so the ownership cases need root (skipped
otherwise). Nothing here compiles or exports: packages and entries are written by hand, then judged by the
same checks the loaders run (the compile/load path itself is tests/test_fast.py's)."""

import json
import logging
import os
import shutil
import stat

import pytest
import torch

from engine.errors import EngineError

OTHER_UID = 12345
as_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                             reason="simulating another user needs root (os.chown)")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# The compiled-package cache's directory.

def test_a_compiled_folder_left_open_to_others_is_refused_not_repaired(cache):
    from engine.backends.compiled import compiled_dir

    (cache / "compiled").mkdir(parents=True)
    (cache / "compiled").chmod(0o777)  # others may have planted packages in it: chmod now would not undo that
    with pytest.raises(EngineError, match="writable by other users.*Remove it"):
        compiled_dir()
    assert stat.S_IMODE((cache / "compiled").stat().st_mode) == 0o777  # left as found, for the operator to judge


def test_a_compiled_symlink_is_refused_and_its_target_left_alone(cache, tmp_path):
    from engine.backends.compiled import compiled_dir

    elsewhere = tmp_path / "planted"
    elsewhere.mkdir(mode=0o755)
    elsewhere.chmod(0o755)
    cache.mkdir()
    (cache / "compiled").symlink_to(elsewhere)
    with pytest.raises(EngineError, match="symlink"):
        compiled_dir()
    assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o755  # not chmod'ed through the link


@as_root
def test_a_cache_root_of_another_user_is_refused(cache):
    from engine.cache_dir import cache_dir

    cache.mkdir(mode=0o700)
    os.chown(cache, OTHER_UID, OTHER_UID)
    with pytest.raises(EngineError, match=f"another user \\(uid {OTHER_UID}\\)"):
        cache_dir("compiled")


def test_the_cache_root_and_kinds_are_made_owner_only(cache):
    from engine.cache_dir import cache_dir

    old = os.umask(0o002)  # a group-writable umask must not leak into the cache
    try:
        path = cache_dir("onnx")
    finally:
        os.umask(old)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(path.stat().st_mode) == 0o700


# A compiled package and its key file.

def _package(cache, sealed=True):
    """A package's bytes under the name its key gives, with its key file as the engine writes it (sealed) or
    as an intruder would, with a recomputed hash (not sealed)."""
    import hashlib

    from engine.backends.compiled import compiled_dir, keep_record, package_key, package_name

    key = package_key("a tiny linear", (torch.randn(2, 4),), torch.device("cpu"))
    package = compiled_dir() / f"{package_name(key)}.pt2"
    package.write_bytes(b"PK not really a package")
    if sealed:
        keep_record(package, package.with_suffix(".json"), key)
    else:
        digest = hashlib.sha256(package.read_bytes()).hexdigest()
        package.with_suffix(".json").write_text(json.dumps({"key": key, "sha256": digest}))
    return package, key


def test_a_package_with_a_recomputed_hash_but_no_seal_is_not_trusted(cache):
    from engine.backends.compiled import distrust

    package, key = _package(cache, sealed=False)
    assert "not sealed by this cache" in distrust(package, key)
    package, key = _package(cache, sealed=True)
    assert distrust(package, key) is None
    record = json.loads(package.with_suffix(".json").read_text())
    package.write_bytes(b"PK another package")  # swapped bytes, hash recomputed, old seal kept
    record["sha256"] = __import__("hashlib").sha256(package.read_bytes()).hexdigest()
    package.with_suffix(".json").write_text(json.dumps(record))
    assert "not sealed by this cache" in distrust(package, key)


def test_a_seal_from_another_cache_secret_is_not_trusted(cache):
    from engine.backends.compiled import distrust

    package, key = _package(cache)
    (cache / ".secret").unlink()  # a new secret: every earlier seal is void
    assert "not sealed by this cache" in distrust(package, key)


@as_root
def test_a_package_or_key_file_of_another_user_is_not_trusted(cache):
    from engine.backends.compiled import distrust

    package, key = _package(cache)
    os.chown(package, OTHER_UID, OTHER_UID)
    assert "belongs to another user" in distrust(package, key)
    os.chown(package, 0, 0)
    os.chown(package.with_suffix(".json"), OTHER_UID, OTHER_UID)
    assert distrust(package, key).startswith("its key file: it belongs to another user")


def test_a_group_writable_or_linked_package_is_not_trusted(cache, tmp_path):
    from engine.backends.compiled import distrust

    package, key = _package(cache)
    package.chmod(0o664)
    assert "writable by other users" in distrust(package, key)
    package.chmod(0o600)
    outside = tmp_path / "outside.pt2"
    outside.write_bytes(package.read_bytes())
    package.unlink()
    package.symlink_to(outside)  # same bytes, same hash: only the link tells
    assert "symlink" in distrust(package, key)


def test_the_secret_must_be_private(cache):
    from engine.cache_dir import seal

    seal(b"x")  # made on first use
    secret = cache / ".secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    secret.chmod(0o644)
    with pytest.raises(EngineError, match="secret.*others can read it"):
        seal(b"x")
    secret.unlink()
    secret.symlink_to(cache / "elsewhere")
    with pytest.raises(EngineError, match="secret.*cannot be read"):
        seal(b"x")


# The ONNX / TensorRT export cache's entries.

def _entry(cache, sealed=True):
    """An export entry written as the cache writes one (a manifest over its files, then sealed)."""
    from engine.cache_dir import cache_dir
    from engine.exported import manifest
    from export.cache import seal_entry

    entry = cache_dir("onnx") / "0123456789abcdef01234567"
    work = entry.with_name(".work")
    (work / "stage").mkdir(parents=True)
    (work / "stage" / "model.onnx").write_bytes(b"a graph")
    manifest.write(work, {"precision": "float32"}, kind="onnx")
    if sealed:
        seal_entry(work, entry)
    work.rename(entry)
    return entry


def test_an_export_entry_is_used_only_with_the_caches_seal(cache, caplog):
    from export.cache import _usable

    entry = _entry(cache)
    assert _usable(entry, "onnx", "ONNX export")
    shutil.rmtree(entry)
    entry = _entry(cache, sealed=False)  # a self-consistent manifest, but no seal: someone else's entry
    with caplog.at_level(logging.WARNING, logger="export.cache"):
        assert not _usable(entry, "onnx", "ONNX export")
    assert "not sealed by this cache" in caplog.text and not os.path.lexists(entry)  # set aside: rebuilt


def test_an_export_entry_edited_after_sealing_is_not_used(cache, caplog):
    from engine.exported import manifest
    from export.cache import _usable

    entry = _entry(cache)
    (entry / "stage" / "model.onnx").write_bytes(b"another graph")
    manifest.write(entry, {"precision": "float32"}, kind="onnx")  # hashes recomputed: the seal tells
    with caplog.at_level(logging.WARNING, logger="export.cache"):
        assert not _usable(entry, "onnx", "ONNX export")
    assert "not sealed" in caplog.text


@as_root
def test_an_export_entry_holding_another_users_file_is_not_used(cache, caplog):
    from export.cache import _usable

    entry = _entry(cache)
    os.chown(entry / "stage" / "model.onnx", OTHER_UID, OTHER_UID)
    with caplog.at_level(logging.WARNING, logger="export.cache"):
        assert not _usable(entry, "onnx", "ONNX export")
    assert "model.onnx it belongs to another user" in caplog.text and not os.path.lexists(entry)


def test_an_export_entry_that_is_a_symlink_is_not_followed(cache, tmp_path, caplog):
    from export.cache import _usable

    real = _entry(cache)
    planted = tmp_path / "planted"
    real.rename(planted)  # sealed under the right name, but now outside: a link to it must not be trusted
    real.symlink_to(planted)
    with caplog.at_level(logging.WARNING, logger="export.cache"):
        assert not _usable(real, "onnx", "ONNX export")
    assert "symlink" in caplog.text and not os.path.lexists(real) and (planted / "manifest.json").is_file()


def test_an_export_kind_folder_open_to_others_is_refused(cache):
    from export.cache import _onnx_entry

    (cache / "onnx").mkdir(parents=True)
    (cache / "onnx").chmod(0o777)
    with pytest.raises(EngineError, match="onnx is refused: it is writable by other users"):
        _onnx_entry(["shapes"], "float32")


@as_root
def test_a_timing_cache_of_another_user_is_not_read(cache, caplog):
    from export.cache import timing_cache_file
    from export.tensorrt import _timing_cache_bytes

    path = timing_cache_file()
    path.write_bytes(b"tactics")
    assert _timing_cache_bytes(path) == b"tactics"
    os.chown(path, OTHER_UID, OTHER_UID)
    with caplog.at_level(logging.WARNING, logger="export.tensorrt"):
        assert _timing_cache_bytes(path) is None
    assert "belongs to another user" in caplog.text and not os.path.lexists(path)
