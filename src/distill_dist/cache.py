"""`distill-dist cache-teacher`: run the frozen teacher once, store its distribution, train KL arms from disk.

Per supervised position the default (hybrid) format keeps the teacher's exact top-k log-probabilities at
the training temperature, the log of the remaining tail mass, the teacher's entropy, and m token ids
drawn from the teacher's distribution renormalised over the tail (seeded by sample id, so any sharding
gives the same bytes): an unbiased target for the KL gradient (random-sampling KD) at ~360 B/position
(k=32, m=64, fp16 values, 3-byte ids) against ~200 KB for dense bf16 logits at the OLMo2 vocabulary.
The older top-k + tail-bucket format (`teacher.format=topk_bucket`) is biased by the tail mass.

Storage: safetensors shards over contiguous slices of the *full* training split, each header naming its
slice (first sample, count, sha256 of the slice's ids), so any data order or subsample reads its rows by
id once the reader has bound them to the split (teacher.py). A shard is written to a temporary name
and renamed; a sidecar with its sha256 and size marks it complete. Re-running skips complete shards and
redoes missing or truncated ones; the manifest, with the fingerprint of everything the values depend on,
is written last. The format and reader live in teacher.py.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import runtime, signals
from .config import RunConfig
from .data import build_train_examples, collate, load_full_train
from .errors import ConfigError
from .fileio import atomic_write_json, canonical_json, checkpoint_fingerprint, sha256_bytes, sha256_file
from .models import DTYPES, load_tokenizer
from .prune import ShardWriter, read_model_config
from .sparse_targets import hybrid_entries, pack_entries, sample_generator, topk_bucket_entries
from .teacher import (MANIFEST, CacheError, LiveTeacher, expected_fingerprint, fingerprint_diff, shard_name, sidecar,
                      split_ids_sha256)

FORMAT_NAMES = {"topk_bucket": "distill_dist.teacher_cache/v1", "hybrid": "distill_dist.teacher_cache/v2"}


# ---------------------------------------------------------------- shards

def shard_complete(path: Path, fp_sha: str) -> bool:
    """Written whole for this fingerprint: the sidecar's size matches (the sha256 was taken at write time;
    `--verify` re-hashes every shard)."""
    side = sidecar(path)
    if not path.is_file() or not side.is_file():
        return False
    meta = json.loads(side.read_text())
    return meta.get("fingerprint_sha256") == fp_sha and meta.get("bytes") == path.stat().st_size


def _write_shard(out: Path, i: int, n: int, first: int, rows: list[dict], parts: list[dict], dtype: str,
                 fp_sha: str) -> None:
    """Shard i of n: rows first.. of the full training split. The header names that slice and hashes its
    ids (the reader binds rows by split index; the fingerprint pins the split), so no id is stored per
    row: at answer positions (one per sample) ids in the header cost ~40 B/position."""
    stored = pack_entries({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, DTYPES[dtype])
    stored["offsets"] = torch.tensor([0] + [len(r["positions"]) for r in rows], dtype=torch.int64).cumsum(0).int()
    path = out / shard_name(i, n)
    # Our own writer, not safetensors.save_file: its metadata order varies between processes, and a
    # resumed cache must equal a one-shot one byte for byte. It writes .tmp and renames.
    tensors = {k: stored[k].contiguous() for k in sorted(stored)}
    writer = ShardWriter(out, [(k, t.dtype, list(t.shape)) for k, t in tensors.items()], 1 << 62, names=[path.name],
                         metadata={"fingerprint_sha256": fp_sha, "first_sample": str(first), "num_samples": str(len(rows)),
                                   "sample_ids_sha256": split_ids_sha256([r["id"] for r in rows])})
    for k, t in tensors.items():
        writer.write(k, t)
    writer.finish()
    positions = int(stored["offsets"][-1])
    atomic_write_json(sidecar(path), {"sha256": sha256_file(path), "bytes": path.stat().st_size, "rows": positions,
                                      "samples": len(rows), "fingerprint_sha256": fp_sha})


def finalize(out: Path, n_shards: int, fp: dict, fp_sha: str, vocab: int, n_samples: int, fmt: str,
             log=print) -> dict | None:
    shards, missing = [], []
    for i in range(n_shards):
        path = out / shard_name(i, n_shards)
        if not shard_complete(path, fp_sha):
            missing.append(i)
            continue
        meta = json.loads(sidecar(path).read_text())
        shards.append({"file": path.name, "sha256": meta["sha256"], "bytes": meta["bytes"], "rows": meta["rows"],
                       "samples": meta["samples"]})
    if missing:
        log(f"{n_shards - len(missing)} of {n_shards} shards complete (missing: {missing[:10]}"
            f"{'...' if len(missing) > 10 else ''}); the manifest is written once all are")
        return None
    rows = sum(s["rows"] for s in shards)
    size = sum(s["bytes"] for s in shards)
    manifest = {"format": FORMAT_NAMES[fmt], "fingerprint": fp, "fingerprint_sha256": fp_sha, "vocab_size": vocab,
                "num_shards": n_shards, "num_samples": n_samples, "num_positions": rows, "bytes": size,
                "bytes_per_position": size / max(rows, 1), "shards": shards}
    atomic_write_json(out / MANIFEST, manifest)
    log(f"teacher cache complete: {out} ({n_samples} samples, {rows} positions, {size / 1e6:.1f} MB, "
        f"{size / max(rows, 1):.0f} bytes/position)")
    return manifest


def verify_cache(out: Path) -> None:
    """`cache-teacher --verify`: re-hash every shard against the manifest."""
    from .teacher import TeacherCache

    TeacherCache.open(out, verify=True)
    print(f"{out}: every shard matches its sha256")


# ---------------------------------------------------------------- computing the cache

def _entries(teacher, rows: list[dict], cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Stored entries for a batch's positions. The head runs once per group of whole samples (up to
    train.chunk_size positions: re-reading a 100k-row head per sample was 7x slower); the draws are taken
    sample by sample, so they depend on (teacher.seed, sample id) only, whatever the batching."""
    tc, tau = cfg.teacher, cfg.train.temperature
    counts = [len(r["positions"]) for r in rows]
    parts, start, i = [], 0, 0
    while i < len(rows):
        j, n = i + 1, counts[i]
        while j < len(rows) and n + counts[j] <= cfg.train.chunk_size:
            n, j = n + counts[j], j + 1
        logits = teacher.hidden[start: start + n] @ teacher.weight.T
        for r, sample_logits in zip(rows[i:j], logits.split(counts[i:j])):
            if tc.format == "hybrid":
                parts.append(hybrid_entries(sample_logits, tau, tc.top_k, tc.samples, sample_generator(tc.seed, r["id"])))
            else:
                parts.append(topk_bucket_entries(sample_logits, tau, tc.top_k))
        start, i = start + n, j
    return {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}


def _num_shards(cfg: RunConfig, n_examples: int) -> int:
    tc = cfg.teacher
    n_shards = tc.num_shards or math.ceil(n_examples / tc.shard_samples)
    if n_shards > n_examples:
        raise ConfigError(f"config field 'teacher.num_shards' = {n_shards}: more shards than the {n_examples} "
                          "training samples; every shard needs at least one")
    if tc.shard is not None and tc.shard >= n_shards:
        raise ConfigError(f"config field 'teacher.shard' = {tc.shard}: the cache has {n_shards} shards (0..{n_shards - 1})")
    return n_shards


def shard_start(n_examples: int, i: int, n_shards: int) -> int:
    """Where shard i's contiguous slice begins; sizes differ by at most one, so no shard is empty."""
    return i * n_examples // n_shards


def shard_rows(examples: list, i: int, n_shards: int) -> list:
    n = len(examples)
    return examples[shard_start(n, i, n_shards): shard_start(n, i + 1, n_shards)]


def _prepare(cfg: RunConfig):
    teacher_dir = cfg.model.path
    if not teacher_dir or not Path(teacher_dir).is_dir():
        raise ConfigError(f"config field 'model.path': no such directory '{teacher_dir}' (the teacher to cache)")
    vocab = read_model_config(Path(teacher_dir))["vocab_size"]
    if vocab >= 1 << 24:
        raise ConfigError(f"vocab_size {vocab} does not fit the cache's 3-byte token ids")
    tok = load_tokenizer(cfg.model.tokenizer or teacher_dir)
    full = load_full_train(cfg.data)
    fp = expected_fingerprint(cfg, checkpoint_fingerprint(teacher_dir), tok, full)
    examples = build_train_examples(tok, full, "kl", cfg.train.positions, cfg.data.max_length, cfg.data.add_bos)
    return tok, fp, vocab, examples, _num_shards(cfg, len(examples))


def run_cache_teacher(cfg: RunConfig, verify: bool = False) -> dict | None:
    """Compute missing shards (this rank's share, or teacher.shard), then write the manifest once every
    shard is present. Every rank decides from the same view of the directory."""
    rt = runtime.init(cfg.train.pg_timeout_minutes)
    out = Path(cfg.teacher.cache_dir)
    if verify:
        return runtime.decide_on_main(lambda: verify_cache(out))
    tok, fp, vocab, examples, n_shards = runtime.decide_on_main(lambda: _prepare(cfg))
    fp_sha = sha256_bytes(canonical_json(fp).encode())
    done = runtime.agree(lambda: _existing_manifest(out, fp, fp_sha))
    if done is not None:
        return done
    wanted = [cfg.teacher.shard] if cfg.teacher.shard is not None else list(range(n_shards))
    todo = runtime.decide_on_main(lambda: [i for i in wanted if not shard_complete(out / shard_name(i, n_shards), fp_sha)])
    _compute_shards(cfg, tok, examples, todo[rt.rank::rt.world_size], n_shards, out, fp_sha)
    runtime.barrier()
    return runtime.decide_on_main(lambda: finalize(out, n_shards, fp, fp_sha, vocab, len(examples), cfg.teacher.format))


def _existing_manifest(out: Path, fp: dict, fp_sha: str) -> dict | None:
    if not (out / MANIFEST).is_file():
        out.mkdir(parents=True, exist_ok=True)
        return None
    old = json.loads((out / MANIFEST).read_text())
    if old.get("fingerprint_sha256") == fp_sha:  # complete, however it was sharded
        if runtime.get().is_main:
            print(f"{out} is complete for this teacher/data/settings; nothing to do")
        return old
    raise CacheError(f"{out} holds a cache with another fingerprint ({fingerprint_diff(old.get('fingerprint', {}), fp)}); "
                     "choose another teacher.cache_dir")


def _compute_shards(cfg, tok, examples, mine: list[int], n_shards: int, out: Path, fp_sha: str):
    """ZeRO-3 forwards are collective: every rank runs the same number of batches (idle ranks repeat one)."""
    from .engines import teacher_engine

    rt, tc = runtime.get(), cfg.teacher
    live = LiveTeacher(teacher_engine(cfg.model.path, cfg), {})
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    shards = {i: shard_rows(examples, i, n_shards) for i in mine}
    batches = [(i, rows[b: b + tc.batch_size]) for i, rows in shards.items() for b in range(0, len(rows), tc.batch_size)]
    n_batches = int(runtime.all_reduce([len(batches)], "max")[0])
    results: dict[int, list] = {i: [] for i in mine}
    t0, positions = time.time(), 0
    for j in tqdm(range(n_batches), desc="cache", unit="batch", disable=not rt.is_main):
        shard_i, rows = batches[j] if j < len(batches) else (None, examples[: tc.batch_size])
        batch = collate(rows, pad_id, rt.device)
        with torch.no_grad(), live.targets(batch, rows) as teacher:
            entries = _entries(teacher, rows, cfg)
        if shard_i is None:
            continue
        results[shard_i].append((rows, entries))
        positions += len(batch["rows"])
        if sum(len(r) for r, _ in results[shard_i]) == len(shards[shard_i]):
            done = results.pop(shard_i)
            _write_shard(out, shard_i, n_shards, shard_start(len(examples), shard_i, n_shards),
                         [r for rs, _ in done for r in rs], [e for _, e in done], tc.dtype, fp_sha)
            if rt.world_size == 1 and signals.stop_requested():  # complete shards stay, the rest is redone
                print(f"stop signal: shard {shard_i} written; exiting with {signals.EXIT_PREEMPTED} for requeue")
                raise signals.Preempted()
    if positions:
        print(f"rank {rt.rank}: cached {positions} positions in {len(mine)} shard(s), "
              f"{positions / (time.time() - t0):.0f} positions/s")
