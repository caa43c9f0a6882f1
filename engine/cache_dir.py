"""Where the engine keeps what it builds once and reuses: ONNX exports, TensorRT engines, compiled U-Nets.

$CASCADE_ENGINE_CACHE, else $XDG_CACHE_HOME/cascade-engine, else ~/.cache/cascade-engine; one subdirectory
per kind (onnx/, tensorrt/, compiled/).

What is in it is run (native code, graphs), so the cache trusts only what no one else could have written:
- The root and each kind's directory are made owner-only (0700). One that is a symlink, belongs to another
  user or is writable by group or others is refused (EngineError), never repaired: whoever could write there
  may have planted entries, and chmod'ing it now would not undo that (nor may we chmod another user's).
- An entry (a file or directory in a kind's directory) that is a symlink, another user's or writable by others
  is reported and moved aside, then rebuilt: it was left by someone else, or before the directory was ours.
- Every entry carries a seal: an HMAC-SHA256, keyed by a secret kept in the root (.secret, 0600), over what
  the entry's loader checks (its key and the hash of its bytes). A file copied in with a recomputed hash has no
  valid seal without the secret.
The folders above the root are the operator's to keep: a root under a folder others can write is as safe as
that folder.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
import uuid
from pathlib import Path

from engine.errors import EngineError

CACHE_ENV = "CASCADE_ENGINE_CACHE"
SECRET = ".secret"  # in the root: the key of every entry's seal


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cascade-engine"


def cache_dir(kind: str) -> Path:
    """The private directory of one kind ("onnx", "tensorrt", "compiled"), made if need be (module docstring)."""
    return private_dir(private_dir(cache_root()) / kind)


def private_dir(path: Path) -> Path:
    """`path`, made owner-only if need be; EngineError if it is a symlink, another user's, or writable by others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    status = path.lstat()
    why = untrusted(status) or (None if stat.S_ISDIR(status.st_mode) else "it is not a directory")
    if why is not None:
        raise EngineError(f"the engine's cache {path} is refused: {why}, so someone else may have put what it holds "
                          f"there, and it holds code the engine runs. Remove it (or set {CACHE_ENV} to a "
                          "directory of your own); the engine makes it again, owner-only")
    if stat.S_IMODE(status.st_mode) != 0o700:
        path.chmod(0o700)  # readable by others: not a threat to what is run, but kept private
    return path


def untrusted(status: os.stat_result) -> str | None:
    """Why a cache file or directory (its lstat) cannot be trusted, or None: a symlink, another user's, or
    writable by group or others."""
    if stat.S_ISLNK(status.st_mode):
        return "it is a symlink"
    if hasattr(os, "getuid") and status.st_uid != os.getuid():
        return f"it belongs to another user (uid {status.st_uid})"
    if status.st_mode & 0o022:
        return f"it is writable by other users (mode {stat.S_IMODE(status.st_mode):o})"
    return None


def untrusted_tree(path: Path) -> str | None:
    """Why an entry (a file, or a directory and everything under it) cannot be trusted, or None."""
    try:
        why = untrusted(path.lstat())
        if why is not None or not path.is_dir():
            return None if why is None else f"{path} {why}"
        for top, dirs, files in os.walk(path):  # never follows links: a link is reported, not entered
            for name in dirs + files:
                why = untrusted(os.lstat(os.path.join(top, name)))
                if why is not None:
                    return f"{os.path.join(top, name)} {why}"
    except OSError as exc:
        return f"it cannot be read ({exc})"
    return None


def owner_only(path: Path) -> None:
    """Make what the engine just wrote (a file, or a directory and everything under it) owner-only, whatever the
    umask: a group-writable entry would be refused on its next use."""
    path.chmod(0o700 if path.is_dir() else 0o600)
    if path.is_dir():
        for top, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(top, name), 0o700)
            for name in files:
                os.chmod(os.path.join(top, name), 0o600)


def set_aside(path: Path) -> None:
    """Take an untrusted or stale entry out of the way (renamed in our own directory, which always works, then
    removed where we may), without following it if it is a link."""
    aside = path.with_name(f".{path.name}.untrusted-{uuid.uuid4().hex[:8]}")
    os.rename(path, aside)
    if aside.is_symlink() or not aside.is_dir():
        aside.unlink()
    else:
        import shutil
        shutil.rmtree(aside, ignore_errors=True)


def seal(data: bytes) -> str:
    """The HMAC-SHA256 of `data` under this cache's secret: what only this account can compute."""
    return hmac.new(_secret(), data, hashlib.sha256).hexdigest()


def sealed(data: bytes, mark) -> bool:
    return isinstance(mark, str) and hmac.compare_digest(seal(data), mark)


def _secret() -> bytes:
    """The root's secret, made once (written under a temporary name, then linked into place: never half there)."""
    path = private_dir(cache_root()) / SECRET
    if not os.path.lexists(path):
        temporary = path.with_name(f"{SECRET}.{uuid.uuid4().hex}")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(secrets.token_bytes(32))
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            temporary.unlink()
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)  # a link is an error here
    except OSError as exc:
        raise EngineError(f"the cache's secret {path} cannot be read ({exc}): remove it, and the cache's entries "
                          "are sealed again with a new one") from exc
    with os.fdopen(descriptor, "rb") as file:
        status = os.fstat(file.fileno())
        why = untrusted(status) or (None if status.st_mode & 0o077 == 0 else "others can read it")
        if why is not None or not stat.S_ISREG(status.st_mode):
            raise EngineError(f"the cache's secret {path} is refused: {why or 'not a regular file'}. Remove it and "
                              "the cache's entries are sealed again with a new one")
        return file.read()
