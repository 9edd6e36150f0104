"""Atomic writes and checkpoint fingerprints shared by every stage.

Every file a stage produces is written to a temporary name in the same directory and renamed into
place, so a crash or preemption never leaves a half-written file where a later stage would read it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

from .errors import CheckpointError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(obj: Any) -> str:
    """The byte-stable JSON form that hashes are taken over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# Files whose content defines a checkpoint (weights + architecture); tokenizer files are fingerprinted
# separately by the stages that care (cache, report), and README/metadata files never count.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
# Written once on request (write_content_hash) beside the weights; the cheap fingerprint defers to it.
CONTENT_HASH_FILE = "distill_dist_content.sha256.json"
_CHEAP_FORMAT = "distill-dist-ckpt-identity-v2"
# Sampled content: SAMPLE_BLOCKS blocks of SAMPLE_BYTES at evenly spaced offsets of each weight file
# (256 KB per file, whatever its size): another fine-tune or another initialisation of the same
# architecture changes essentially every tensor, so it cannot hide between the samples.
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 4096
_MAX_HEADER_BYTES = 100 * 2**20  # the safetensors format caps its JSON header at 100 MB


def checkpoint_files(ckpt_dir: str | os.PathLike) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{ckpt_dir}: no such checkpoint directory")
    files = [p for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES)]
    if not files:
        raise CheckpointError(f"{ckpt_dir}: no weight files (*.safetensors, *.bin, *.pt)")
    if (ckpt_dir / "config.json").is_file():
        files.insert(0, ckpt_dir / "config.json")
    return files


def safetensors_header(path: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file (tensor names, dtypes, shapes, offsets, metadata).

    Reads the 8-byte little-endian length and the header only, never the tensor bytes.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or n > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: not a safetensors file (header length {n} for a file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def sampled_sha256(path: Path) -> str:
    """sha256 over SAMPLE_BLOCKS evenly spaced blocks of the file (all of it when it is small)."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= SAMPLE_BLOCKS * SAMPLE_BYTES:
            h.update(f.read())
        else:
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * (size - SAMPLE_BYTES) // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()


def _file_identity(path: Path) -> dict:
    """What identifies one checkpoint file cheaply: name, size and, for safetensors, the header plus a
    sample of the tensor bytes; config.json and pickled weights (.bin/.pt, no header) by their content."""
    ident: dict[str, Any] = {"name": path.name, "size": path.stat().st_size}
    if path.suffix == ".safetensors":
        ident["header_sha256"] = sha256_bytes(canonical_json(safetensors_header(path)).encode())
        ident["sample_sha256"] = sampled_sha256(path)
    else:
        ident["sha256"] = sha256_file(path)
    return ident


def checkpoint_identity(ckpt_dir: str | os.PathLike) -> list[dict]:
    return [_file_identity(p) for p in checkpoint_files(ckpt_dir)]


def _full_fingerprint(files: list[Path]) -> str:
    """sha256 over config.json and every weight file (name + content hash): reads every byte."""
    entries = [(p.name, sha256_file(p)) for p in files]
    return sha256_bytes(canonical_json(entries).encode())


def write_content_hash(ckpt_dir: str | os.PathLike) -> str:
    """Hash every weight byte once and store the result beside the checkpoint (CONTENT_HASH_FILE), with
    the sizes/headers it was taken over; returns the full fingerprint, which the cheap one then reports."""
    files = checkpoint_files(ckpt_dir)
    record = {"format": _CHEAP_FORMAT, "files": [_file_identity(p) for p in files],
              "fingerprint": _full_fingerprint(files)}
    atomic_write_json(Path(ckpt_dir) / CONTENT_HASH_FILE, record)
    return record["fingerprint"]


def stored_content_fingerprint(ckpt_dir: str | os.PathLike, identity: list[dict] | None = None) -> str | None:
    """The stored full fingerprint, or None when there is none or it no longer describes the files
    (another name, size, header or config: the file is stale and ignored, with a warning)."""
    path = Path(ckpt_dir) / CONTENT_HASH_FILE
    if not path.is_file():
        return None
    identity = checkpoint_identity(ckpt_dir) if identity is None else identity
    try:
        record = json.loads(path.read_text())
        valid = record.get("format") == _CHEAP_FORMAT and record.get("files") == identity
    except (ValueError, AttributeError):
        valid = False
    if not valid:
        warnings.warn(f"{path} does not match the checkpoint's files (stale or corrupt): ignored; "
                      "re-run write_content_hash to refresh it", stacklevel=2)
        return None
    return record["fingerprint"]


def checkpoint_fingerprint(ckpt_dir: str | os.PathLike, full: bool = False) -> str:
    """The id of a checkpoint's weights + architecture, which later stages compare.

    Default (cheap, independent of model size): the stored full content hash when CONTENT_HASH_FILE is
    present and still matches the files, else sha256 over config.json's content and each weight file's
    name, size and safetensors header. The cheap id cannot see a changed weight value that keeps every
    name, dtype, shape and size; `full=True` reads every byte (and equals the stored hash when valid).
    """
    if full:
        return _full_fingerprint(checkpoint_files(ckpt_dir))
    identity = checkpoint_identity(ckpt_dir)
    stored = stored_content_fingerprint(ckpt_dir, identity)
    if stored is not None:
        return stored
    return sha256_bytes(canonical_json({"format": _CHEAP_FORMAT, "files": identity}).encode())


def dir_bytes(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place; an existing one is moved aside first, then removed."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
