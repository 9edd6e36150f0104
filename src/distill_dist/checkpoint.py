"""Checkpoints and resume: sharded DeepSpeed state + each rank's RNG, committed only when complete.

A checkpoint is `step_NNNNNNN/` under the run's `checkpoints/`: DeepSpeed's sharded engine state, one
`rng_rankN.pt` per rank, then a `COMPLETE` marker (with the world size) written by rank 0 after every
rank has finished, and only then does `latest_complete` move to it. A kill at any moment leaves the
previous complete checkpoint as the one a re-run resumes from. The data position is the step number, so
a resumed run continues the uninterrupted loss curve: bit for bit on CPU, on CUDA to rounding (bit for bit
only with train.deterministic=true on the same hardware and software; recipe.py says why).

Each rank's RNG file holds the generators of the rank's own device only (its CUDA device, not every GPU
the node shows), so a job resumed at the same world size on nodes that show fewer GPUs per task restores.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_json, atomic_write_text

LATEST_FILE = "latest_complete"
COMPLETE_FILE = "COMPLETE"
DONE_FILE = "done.json"  # a finished run's result, written last: a re-run of a finished run does nothing
EXPORTED_FILE = "exported.json"  # final/ holds the student at max_steps: a re-run only evaluates it


def finished(run_dir: Path) -> dict | None:
    """The result of a finished run (its DONE_FILE), announced once; None while it is not finished."""
    done = Path(run_dir) / DONE_FILE
    if not done.is_file():
        return None
    if os.environ.get("RANK", "0") == "0":  # may run before the process group exists
        print(f"{run_dir} is complete ({DONE_FILE} exists); nothing to do")
    return json.loads(done.read_text())


def mark_finished(run_dir: Path, result: dict) -> None:
    atomic_write_json(Path(run_dir) / DONE_FILE, result)


def exported(run_dir: Path, config_sha256: str) -> dict | None:
    """The export record of this very run config (final/ complete at max_steps), or None."""
    path = Path(run_dir) / EXPORTED_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("config_sha256") == config_sha256 else None


def mark_exported(run_dir: Path, root: Path, record: dict) -> None:
    """Rank 0, once final/ is committed: record the export, then drop every checkpoint. From here on a
    re-run needs only final/ (weights) and this record (to skip training); the optimizer state is dead
    weight (~12 B/param), so a finished run keeps no checkpoint at all."""
    atomic_write_json(Path(run_dir) / EXPORTED_FILE, record)
    shutil.rmtree(root, ignore_errors=True)


def rng_state(device: torch.device) -> dict:
    """This rank's generators: host ones and, on CUDA, only `device`'s (the one this rank computes on)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(s: dict, device: torch.device) -> None:
    """Restore `rng_state`'s generators, the CUDA one onto `device` whatever index it had when saved. An
    older file's list (one state per GPU the node showed) restores its entry for `device`'s index."""
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    cuda = s["cuda"]
    if cuda is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        index = device.index or 0
        if index >= len(cuda):
            raise CheckpointError(f"the checkpoint's RNG file holds {len(cuda)} CUDA generator(s) and this rank "
                                  f"runs on cuda:{index}; resume on nodes showing as many GPUs as when it was saved")
        cuda = cuda[index]
    torch.cuda.set_rng_state(cuda, device)


@contextmanager
def _commit_waits_slow(engine):
    """DeepSpeed's save_checkpoint ends in a barrier on the process group, under its short timeout, right
    after each rank's checkpoint engine commits its written shards: on a slow filesystem the ranks done
    first would wait there for the slowest writer and time out. Each rank commits through the slow barrier
    first, so DeepSpeed's own barrier finds every rank's writes done and returns at once."""
    writer = engine.checkpoint_engine
    if writer.is_decoupled():  # commits later, outside save_checkpoint: nothing of ours to hook
        yield
        return
    commit = writer.commit

    def commit_after_every_rank_wrote(info):
        runtime.barrier(slow=True)
        return commit(info)

    writer.commit = commit_after_every_rank_wrote
    try:
        yield
    finally:
        writer.commit = commit


def save(engine, root: Path, step: int, keep: int) -> None:
    """Collective: every rank writes its shards and RNG; rank 0 commits and prunes old checkpoints.
    Every wait on disk work is a slow barrier (runtime's io timeout), not the short process-group one."""
    rt = runtime.get()
    tag = f"step_{step:07d}"
    tag_dir = root / tag
    if rt.is_main and tag_dir.exists():
        shutil.rmtree(tag_dir)
    runtime.barrier(slow=True)
    # Frozen parameters (a LoRA run's base) are not written: the run reloads them from the student unchanged.
    with _commit_waits_slow(engine):
        engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)
    torch.save(rng_state(rt.device), tag_dir / f"rng_rank{rt.rank}.pt.tmp")
    (tag_dir / f"rng_rank{rt.rank}.pt.tmp").replace(tag_dir / f"rng_rank{rt.rank}.pt")
    runtime.barrier(slow=True)
    if rt.is_main:
        # The size of every file the checkpoint holds: a resume refuses one cut short after it was committed.
        sizes = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*")) if p.is_file()}
        atomic_write_json(tag_dir / COMPLETE_FILE, {"step": step, "world_size": rt.world_size, "files": sizes})
        atomic_write_text(root / LATEST_FILE, tag + "\n")
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in tags[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    runtime.barrier(slow=True)


def latest(root: Path) -> tuple[Path, dict] | None:
    """The last complete checkpoint and its COMPLETE record, or None."""
    pointer = root / LATEST_FILE
    if not pointer.is_file():
        return None
    tag_dir = root / pointer.read_text().strip()
    marker = tag_dir / COMPLETE_FILE
    if not marker.is_file():
        raise CheckpointError(f"{pointer} names {tag_dir.name}, which has no {COMPLETE_FILE} marker (corrupt checkpoint dir)")
    text = marker.read_text().strip()
    try:
        info = json.loads(text) if text.startswith("{") else {"step": int(text), "world_size": None}
    except ValueError:
        raise CheckpointError(f"{marker}: unreadable {COMPLETE_FILE} marker (expected the step and world size); "
                              f"delete {tag_dir} and point {pointer} at the checkpoint before it") from None
    return tag_dir, info


def _check_files(tag_dir: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        path = tag_dir / name
        have = path.stat().st_size if path.is_file() else None
        if have != size:
            raise CheckpointError(f"{path}: {'missing' if have is None else f'{have} bytes'}, the checkpoint recorded "
                                  f"{size} (truncated or removed after it was written); delete {tag_dir} and point "
                                  f"{tag_dir.parent / LATEST_FILE} at the checkpoint before it, or start a new "
                                  "train.output_dir")


def check_resumable(root: Path) -> int:
    """Rank-symmetric: the step to resume from (0 = fresh), or one error on every rank."""
    rt = runtime.get()

    def check() -> int:
        found = latest(root)
        if found is None:
            return 0
        tag_dir, info = found
        if info["world_size"] not in (None, rt.world_size):
            raise ConfigError(f"{tag_dir} was written by {info['world_size']} ranks and this job has {rt.world_size}: "
                              f"resume with {info['world_size']} ranks (or start a new train.output_dir)")
        if not (tag_dir / f"rng_rank{rt.rank}.pt").is_file():
            raise CheckpointError(f"{tag_dir}: no rng_rank{rt.rank}.pt; resume with the number of ranks that wrote it")
        _check_files(tag_dir, info.get("files", {}))
        return info["step"]

    return runtime.agree(check)


def resume(engine, root: Path, step: int) -> int:
    """Load the last complete checkpoint (`step`, as `check_resumable` agreed) into `engine` and this rank's
    RNG; returns the step it holds (0 = fresh start)."""
    if step == 0:
        return 0
    tag_dir, _ = latest(root)
    frozen = any(not p.requires_grad for p in engine.module.parameters())  # not saved (see save): not expected
    path, client = engine.load_checkpoint(str(root), tag=tag_dir.name, load_module_strict=not frozen)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
    set_rng_state(torch.load(tag_dir / f"rng_rank{runtime.get().rank}.pt", weights_only=False), runtime.get().device)
    if runtime.get().is_main:
        print(f"resuming from {tag_dir} (step {client['step']})")
    return client["step"]


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, tolerating a torn last line (a kill during an append): the checkpoint is the truth."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # only ever the last, partial line
    return out


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, keep metric lines up to the checkpoint's step so the curve continues without duplicates."""
    if path.is_file():
        kept = [m for m in read_metrics(path) if m["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(m) + "\n" for m in kept))
