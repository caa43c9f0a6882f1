"""manifest.json of an exported directory: every file's SHA-256, and checking a directory against it.

An exported directory is trusted only if every file the manifest lists exists with the listed hash; a missing
or changed file (a partial copy, a flipped byte) is reported, never run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.errors import ModelError

MANIFEST = "manifest.json"
FORMAT_PREFIX = "cascade-engine-"  # a manifest's "format" is this and its kind: "cascade-engine-onnx", ...
FORMAT_VERSION = 1
CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def source_hash(dirs: list[Path]) -> str:
    """One SHA-256 over the content of every file of every stage directory (weights, configs, tokenizer): the
    export cache's and the compiled cache's key for a model's files."""
    digest = hashlib.sha256()
    for i, stage_dir in enumerate(dirs):
        for relative, file_hash in hash_tree(stage_dir).items():
            digest.update(f"{i}/{relative}:{file_hash}\n".encode())
    return digest.hexdigest()


def hash_tree(root: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative posix path: sha256} of every regular file under root (hidden files and `skip` names left out)."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in relative.parts) and path.name not in skip:
            files[relative.as_posix()] = sha256_file(path)
    return files


def write(root: Path, manifest: dict, kind: str = "onnx") -> None:
    manifest = {"format": FORMAT_PREFIX + kind, "format_version": FORMAT_VERSION, **manifest,
                "files": hash_tree(root, skip=(MANIFEST,))}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def is_exported(root: Path) -> bool:
    return (root / MANIFEST).is_file()


def export_kind(root: Path) -> str | None:
    """The kind of an exported directory ("onnx", "tensorrt": its manifest's format names it), None without a
    manifest; ModelError for a manifest of no kind. Which backend runs a kind is backends.BACKENDS' to say."""
    if not is_exported(root):
        return None
    return _kind(_read(root / MANIFEST), root / MANIFEST)


def _read(file: Path) -> dict:
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(file, f"cannot read the export manifest: {exc}; re-export the model") from exc
    if not isinstance(manifest, dict):
        raise ModelError(file, "not an export manifest; re-export the model with `python -m engine export`")
    return manifest


def _kind(manifest: dict, file: Path = Path(MANIFEST)) -> str:
    name = manifest.get("format")
    kind = name[len(FORMAT_PREFIX):] if isinstance(name, str) and name.startswith(FORMAT_PREFIX) else ""
    if not kind.replace("-", "").isalnum():
        raise ModelError(file, f"not a manifest of a {FORMAT_PREFIX}KIND export (onnx, tensorrt); re-export the "
                               "model with `python -m engine export`")
    return kind


def verify(root: Path) -> dict:
    """The manifest of `root` after checking every listed file; ModelError naming the first problem otherwise."""
    file = root / MANIFEST
    manifest = _read(file)
    _kind(manifest, file)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(file, f"export format version {manifest.get('format_version')} is not the supported "
                               f"{FORMAT_VERSION}; re-export the model with this version of the engine")
    for relative, expected in manifest.get("files", {}).items():
        path = root / relative
        if not path.is_file():
            raise ModelError(path, "missing from the exported directory (a partial copy?); re-export the model")
        if sha256_file(path) != expected:
            raise ModelError(path, "does not match its SHA-256 in manifest.json: the file is corrupt or was "
                                   "changed after export; re-export the model")
    return manifest


def read_manifest(root: Path, kind: str | None = None) -> dict:
    """The verified manifest of an exported directory (ModelError if anything is missing or changed, or if it
    is not of `kind`, "onnx" or "tensorrt", when given)."""
    if not is_exported(root):
        raise ModelError(root, "not an exported directory (no manifest.json)")
    manifest = verify(root)
    if kind is not None and _kind(manifest) != kind:
        raise ModelError(root, f"is a {_kind(manifest)} export, not {kind}: load it without backend= (the "
                               "backend of its kind runs it)")
    return manifest
