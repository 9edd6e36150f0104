"""The teacher-logit cache, in one place: its on-disk format, `distill-dist cache-teacher` that writes it, and
the reader the KL arm trains from (run the frozen teacher once, store its distribution, train KL arms from disk).

Per supervised position the default (hybrid) format keeps the teacher's exact top-k log-probabilities at
the training temperature, the log of the remaining tail mass, the teacher's entropy, and m token ids
drawn from the teacher's distribution renormalised over the tail (seeded by sample id, so any sharding
gives the same bytes): an unbiased target for the KL gradient (random-sampling KD) at ~360 B/position
(k=32, m=64, fp16 values, 3-byte ids) against ~200 KB for dense bf16 logits at the OLMo2 vocabulary.
The older top-k + tail-bucket format (`teacher.format=topk_bucket`) is biased by the tail mass.

Storage: safetensors shards over contiguous slices of the *full* training split, each header naming its
slice (first sample, count, sha256 of the slice's ids), so any data order or subsample reads its rows by
id once the reader has bound them to the split. A shard is written to a temporary name and renamed; a
sidecar with its sha256 and size marks it complete. Re-running skips complete shards and redoes missing or
truncated ones; the manifest, with the fingerprint of everything the values depend on, is written last.
The reader reads every shard whole and checks its sha256 against the manifest as it reads (a flipped byte
is refused before any step uses it), so `--verify` is the same check run on its own.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from . import runtime, signals
from .config import RunConfig
from .data import KL_CLOZE_ROWS, PROMPT_VERSION, build_train_examples, collate, load_full_train, pad_token_id
from .errors import ConfigError, UserError
from .fileio import atomic_write_json, canonical_json, sha256_bytes, sha256_file
from .hf_checkpoint import ShardWriter, checkpoint_fingerprint, read_header, read_model_config
from .models import TORCH_DTYPES, load_tokenizer
from .progress import progress_bar
from .sparse_targets import HYBRID, TOPK_BUCKET, hybrid_entries, pack_entries, sample_generator, topk_bucket_entries

FORMAT_IDS = {TOPK_BUCKET: "distill_dist.teacher_cache/v1", HYBRID: "distill_dist.teacher_cache/v2"}
MANIFEST = "manifest.json"


class CacheError(UserError):
    pass


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.safetensors"


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


# ---------------------------------------------------------------- fingerprint

def tokenizer_hash(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return sha256_bytes(text.encode())


def data_hash(ds) -> str:
    """Content of the normalised split (ids, questions, choices, answers), whatever file or hub it came from."""
    rows = [[r["id"], r["question"], r["choices"], r["answer"]] for r in ds]
    return sha256_bytes(canonical_json(rows).encode())


def split_ids_sha256(ids: list[str]) -> str:
    return sha256_bytes(canonical_json(ids).encode())


def expected_fingerprint(cfg: RunConfig, teacher_fingerprint: str, tok, full_train) -> dict:
    """Everything the cached values depend on. `full_train` is the unsubsampled train split."""
    tc = cfg.teacher
    fp = {"teacher": teacher_fingerprint, "tokenizer": tokenizer_hash(tok), "data": data_hash(full_train),
          "sample_ids": split_ids_sha256(list(full_train["id"])),
          "prompt_version": PROMPT_VERSION, "data.format": cfg.data.format, "max_length": cfg.data.max_length,
          "add_bos": cfg.data.add_bos, "positions": cfg.train.positions, "top_k": tc.top_k, "dtype": tc.dtype,
          "temperature": cfg.train.temperature, "format": tc.format}
    if cfg.data.format == "cloze":  # the rows cached: the prompt and every choice (data.build_train_examples)
        fp["kl_rows"] = KL_CLOZE_ROWS
    if tc.format == HYBRID:
        fp.update(samples=tc.samples, seed=tc.seed)
    return fp


def fingerprint_diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    short = lambda v: str(v)[:12] if len(str(v)) == 64 else str(v)  # noqa: E731
    return ", ".join(f"{k}: cache {short(old.get(k))} vs run {short(new.get(k))}" for k in keys) or "format"


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
    stored = pack_entries({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, TORCH_DTYPES[dtype])
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
    manifest = {"format": FORMAT_IDS[fmt], "fingerprint": fp, "fingerprint_sha256": fp_sha, "vocab_size": vocab,
                "num_shards": n_shards, "num_samples": n_samples, "num_positions": rows, "bytes": size,
                "bytes_per_position": size / max(rows, 1), "shards": shards}
    atomic_write_json(out / MANIFEST, manifest)
    log(f"teacher cache complete: {out} ({n_samples} samples, {rows} positions, {size / 1e6:.1f} MB, "
        f"{size / max(rows, 1):.0f} bytes/position)")
    return manifest


def verify_cache(out: Path) -> None:
    """`cache-teacher --verify`: the reader's own checks (size, sha256, header of every shard), on their own."""
    TeacherCache.open(out)
    print(f"{out}: every shard matches its sha256")


# ---------------------------------------------------------------- reading

class TeacherCache:
    """The cache as the KL arm reads it: every shard read whole and checked against the manifest's size and
    sha256, rows looked up by sample id once `check` has matched the run and bound them to the training split.

    A shard holds a contiguous slice of the full training split; its header names the slice (first
    sample, count, sha256 of the slice's ids), so no id is stored per row. Caches written before this
    layout carry the ids themselves in the header and are read as they are.
    """

    def __init__(self, root: Path, manifest: dict, shards: list[dict]):
        self.root, self.manifest, self._shards = root, manifest, shards
        self._by_id: dict[str, dict] | None = None

    @property
    def vocab_size(self) -> int:
        return self.manifest["vocab_size"]

    @property
    def fingerprint_sha256(self) -> str:
        return self.manifest["fingerprint_sha256"]

    @classmethod
    def open(cls, cache_dir: str | os.PathLike) -> "TeacherCache":
        root = Path(cache_dir)
        if not (root / MANIFEST).is_file():
            raise CacheError(f"{root}: no {MANIFEST} (run `distill-dist cache-teacher` to completion first)")
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format") not in FORMAT_IDS.values():
            raise CacheError(f"{root / MANIFEST}: format {manifest.get('format')!r}, expected one of "
                             f"{sorted(FORMAT_IDS.values())}")
        return cls(root, manifest, [_read_shard(root / s["file"], s) for s in manifest["shards"]])

    def to(self, device) -> "TeacherCache":
        """Hold every shard's entries on `device`, before `check` binds rows to them: the answer-position cache
        of CSQA train is ~4 MB (~150 MB at every prompt position), so a micro-step slices device memory
        instead of unpacking on the host and copying pageable memory to the GPU."""
        for shard in self._shards:
            shard["stored"] = {k: t.to(device) for k, t in shard["stored"].items()}
        return self

    def check(self, expected: dict, sample_ids: list[str], split_ids: list[str]) -> None:
        """Refuse a cache made for another teacher / tokenizer / data / prompt / k / dtype / temperature,
        then bind its rows to `split_ids` (the full training split, in order) and refuse missing samples."""
        if self.manifest["fingerprint"] != expected:
            raise CacheError(f"teacher cache {self.root} does not match this run: "
                             f"{fingerprint_diff(self.manifest['fingerprint'], expected)}")
        self._by_id = {}
        for shard in self._shards:
            self._by_id.update(_rows_by_id(shard, split_ids))
        missing = [s for s in sample_ids if s not in self._by_id]
        if missing:
            raise CacheError(f"teacher cache {self.root} lacks {len(missing)} training samples (e.g. {missing[0]})")

    def entries(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The stored entries of the rows' positions, concatenated in collate order."""
        if self._by_id is None:
            raise RuntimeError("TeacherCache.entries before check(): rows are not bound to the training split")
        parts = [self._by_id[r["id"]] for r in rows]
        for r, p in zip(rows, parts):
            n = next(iter(p.values())).shape[0]
            if n != len(r["positions"]):
                raise CacheError(f"teacher cache {self.root}: sample {r['id']} has {n} positions, "
                                 f"the run needs {len(r['positions'])}")
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _read_shard(path: Path, entry: dict) -> dict:
    """{path, meta, stored tensors, offsets} of a shard whose bytes match the manifest's size and sha256.

    The shard is read whole anyway, so its checksum is taken over the very bytes that are then parsed:
    one pass, and nothing that differs from what cache-teacher wrote is ever trained on."""
    if not path.is_file():
        raise CacheError(f"{path}: shard missing from the cache")
    data = path.read_bytes()
    if "bytes" in entry and len(data) != entry["bytes"]:
        raise CacheError(f"{path}: {len(data)} bytes, the manifest says {entry['bytes']} (truncated or "
                         "replaced shard); delete it and re-run cache-teacher")
    if sha256_bytes(data) != entry["sha256"]:
        raise CacheError(f"{path}: checksum mismatch (corrupt shard: its bytes changed after cache-teacher wrote "
                         "them); delete it and re-run cache-teacher")
    try:
        meta = read_header(path, data)[1].get("__metadata__", {})
        stored = load_safetensors(data)
    except Exception as e:
        raise CacheError(f"{path}: unreadable shard ({str(e).splitlines()[0]}); delete it and re-run cache-teacher") from None
    return {"path": path, "meta": meta, "offsets": stored.pop("offsets"), "stored": stored}


def _rows_by_id(shard: dict, split_ids: list[str]) -> dict[str, dict]:
    meta, path = shard["meta"], shard["path"]
    if "sample_ids" in meta:  # the earlier layout: ids in the header
        ids = json.loads(meta["sample_ids"])
    else:
        first, n = int(meta["first_sample"]), int(meta["num_samples"])
        ids = split_ids[first: first + n]
        if len(ids) != n or split_ids_sha256(ids) != meta["sample_ids_sha256"]:
            raise CacheError(f"{path}: written for training samples {first}..{first + n - 1} of another split "
                             "(their ids differ); re-run cache-teacher into a new teacher.cache_dir")
    off, stored = shard["offsets"], shard["stored"]
    return {sid: {k: t[int(off[j]): int(off[j + 1])] for k, t in stored.items()} for j, sid in enumerate(ids)}


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
            if tc.format == HYBRID:
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
    examples = build_train_examples(tok, full, "kl", cfg.train.positions, cfg.data.max_length, cfg.data.add_bos,
                                    cfg.data.format)
    return tok, fp, vocab, examples, _num_shards(cfg, len(examples))


def run_cache_teacher(cfg: RunConfig, verify: bool = False) -> dict | None:
    """Compute missing shards (this rank's share, or teacher.shard), then write the manifest once every
    shard is present. Every rank decides from the same view of the directory."""
    rt = runtime.init(cfg.train.pg_timeout_minutes, cfg.train.io_timeout_minutes)
    out = Path(cfg.teacher.cache_dir)
    if verify:  # rank 0 re-hashes every shard (minutes for a large cache): the others wait under the I/O timeout
        return runtime.decide_on_main(lambda: verify_cache(out), slow=True)
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
    from .engines import LiveTeacher, teacher_engine

    rt, tc = runtime.get(), cfg.teacher
    live = LiveTeacher(teacher_engine(cfg.model.path, cfg), {})
    shards = {i: shard_rows(examples, i, n_shards) for i in mine}
    batches = [(i, rows[b: b + tc.batch_size]) for i, rows in shards.items() for b in range(0, len(rows), tc.batch_size)]
    n_batches = int(runtime.all_reduce([len(batches)], "max")[0])
    results: dict[int, list] = {i: [] for i in mine}
    t0, positions = time.time(), 0
    for j in progress_bar(range(n_batches), desc="cache", unit="batch", disable=not rt.is_main):
        shard_i, rows = batches[j] if j < len(batches) else (None, examples[: tc.batch_size])
        batch = collate(rows, pad_token_id(tok), rt.device)
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
