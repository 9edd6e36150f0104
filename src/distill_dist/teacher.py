"""Teacher targets for the supervised positions of a micro-batch: one interface, two suppliers.

`LiveTeacher` runs the frozen ZeRO-3 teacher (hidden states at the positions, LM head gathered once per
micro-step) and yields a `DenseTeacher`; `CachedTeacher` reads the teacher-logit cache written by
`distill-dist cache-teacher` and yields a `SparseTeacher`. The loss takes either without knowing which.
Both are used as `with targets.targets(batch, rows) as teacher: loss = student(..., teacher=teacher)`:
the live head stays gathered only while the loss forward runs (the fused loss needs no teacher in backward).

The cache's on-disk format (manifest, shard names, sidecars) is defined here, next to its reader;
cache.py writes it.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open

from . import runtime
from .config import RunConfig
from .data import PROMPT_VERSION, load_full_train
from .errors import ConfigError, UserError
from .fileio import canonical_json, checkpoint_fingerprint, sha256_bytes, sha256_file
from .losses import DenseTeacher, LossSpec
from .prune import read_model_config
from .sparse_targets import sparse_teacher, unpack_entries

CACHE_FORMATS = {"distill_dist.teacher_cache/v1": "topk_bucket", "distill_dist.teacher_cache/v2": "hybrid"}
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
    """Content of the normalised split (ids, questions, choices), whatever file or hub it came from."""
    rows = [[r["id"], r["question"], r["choices"]] for r in ds]
    return sha256_bytes(canonical_json(rows).encode())


def split_ids_sha256(ids: list[str]) -> str:
    return sha256_bytes(canonical_json(ids).encode())


def expected_fingerprint(cfg: RunConfig, teacher_fingerprint: str, tok, full_train) -> dict:
    """Everything the cached values depend on. `full_train` is the unsubsampled train split."""
    tc = cfg.teacher
    fp = {"teacher": teacher_fingerprint, "tokenizer": tokenizer_hash(tok), "data": data_hash(full_train),
          "sample_ids": split_ids_sha256(list(full_train["id"])),
          "prompt_version": PROMPT_VERSION, "max_length": cfg.data.max_length, "add_bos": cfg.data.add_bos,
          "positions": cfg.train.positions, "top_k": tc.top_k, "dtype": tc.dtype,
          "temperature": cfg.train.temperature, "format": tc.format}
    if tc.format == "hybrid":
        fp.update(samples=tc.samples, seed=tc.seed)
    return fp


# ---------------------------------------------------------------- live

class LiveTeacher:
    """The frozen unpruned model as a ZeRO-3 inference engine (every rank runs it every micro-step)."""

    def __init__(self, engine, describe: dict):
        self.engine, self._describe = engine, describe

    def describe(self) -> dict:
        return self._describe

    @contextmanager
    def targets(self, batch: dict, rows: list[dict]):
        head = self.engine.module.lm.lm_head.weight
        with torch.no_grad():
            hidden = self.engine(**batch)
        gather = nullcontext()
        if hasattr(head, "ds_id"):  # ZeRO-3: the sharded head, gathered once per micro-step on every rank
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([head], modifier_rank=None)
        with gather:
            yield DenseTeacher(hidden, head.detach())


# ---------------------------------------------------------------- cache

class TeacherCache:
    """The cache as the KL arm reads it: shards checked by size and header (full sha256 on demand), rows
    looked up by sample id once `check` has matched the run and bound the rows to the training split.

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
    def open(cls, cache_dir: str | os.PathLike, verify: bool = False) -> "TeacherCache":
        root = Path(cache_dir)
        if not (root / MANIFEST).is_file():
            raise CacheError(f"{root}: no {MANIFEST} (run `distill-dist cache-teacher` to completion first)")
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("format") not in CACHE_FORMATS:
            raise CacheError(f"{root / MANIFEST}: format {manifest.get('format')!r}, expected one of {sorted(CACHE_FORMATS)}")
        return cls(root, manifest, [_read_shard(root / s["file"], s, verify) for s in manifest["shards"]])

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


def _read_shard(path: Path, entry: dict, verify: bool) -> dict:
    """{path, meta, stored tensors, offsets}: size checked against the manifest, sha256 with --verify."""
    if not path.is_file():
        raise CacheError(f"{path}: shard missing from the cache")
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        raise CacheError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']} (truncated or "
                         "replaced shard); delete it and re-run cache-teacher")
    if verify and sha256_file(path) != entry["sha256"]:
        raise CacheError(f"{path}: checksum mismatch (corrupt shard); delete it and re-run cache-teacher")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
            stored = {k: f.get_tensor(k) for k in f.keys()}
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


class CachedTeacher:
    """Teacher targets read from a verified cache: the teacher is never loaded."""

    def __init__(self, cache: TeacherCache, device: torch.device):
        self.cache, self.device = cache, device

    def describe(self) -> dict:
        return {"source": "cache", "path": str(self.cache.root), "fingerprint": self.cache.fingerprint_sha256,
                "format": self.cache.manifest["format"]}

    @contextmanager
    def targets(self, batch: dict, rows: list[dict]):
        yield sparse_teacher(unpack_entries(self.cache.entries(rows))).to(self.device)


def fingerprint_diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    short = lambda v: str(v)[:12] if len(str(v)) == 64 else str(v)  # noqa: E731
    return ", ".join(f"{k}: cache {short(old.get(k))} vs run {short(new.get(k))}" for k in keys) or "format"


# ---------------------------------------------------------------- choosing the supplier

def open_teacher_targets(cfg: RunConfig, spec: LossSpec, plan: dict, tok, examples: list[dict], student_dir: str):
    """None for the CE arm; else the live teacher or the cache, after rank-symmetric checks."""
    if not spec.needs_teacher:
        return None
    root_fp = plan.get("root_fingerprint", plan["source_fingerprint"])
    s_vocab = read_model_config(Path(student_dir)).get("vocab_size")
    if cfg.teacher.source == "cache":
        def open_cache() -> TeacherCache:
            if spec.kind != "kl":
                raise ConfigError(f"config field 'teacher.source' = 'cache': a teacher-logit cache supports "
                                  f"train.loss=kl only, not '{spec.kind}'")
            cache = TeacherCache.open(cfg.teacher.cache_dir)
            if cache.vocab_size != s_vocab:
                raise ConfigError(f"teacher cache vocab_size {cache.vocab_size} != student vocab_size {s_vocab}: "
                                  "distillation needs the same vocabulary")
            full = load_full_train(cfg.data)
            cache.check(expected_fingerprint(cfg, root_fp, tok, full), [r["id"] for r in examples], list(full["id"]))
            return cache

        return CachedTeacher(runtime.agree(open_cache), runtime.get().device)
    teacher_dir = cfg.model.path
    fingerprint = runtime.decide_on_main(lambda: _check_live_teacher(teacher_dir, root_fp, s_vocab))
    from .engines import teacher_engine

    return LiveTeacher(teacher_engine(teacher_dir, cfg), {"source": "live", "path": teacher_dir,
                                                          "fingerprint": fingerprint})


def _check_live_teacher(teacher_dir: str | None, root_fp: str, s_vocab: int) -> str:
    if not teacher_dir or not Path(teacher_dir).is_dir():
        raise ConfigError(f"config field 'model.path': the KL arm needs the unpruned teacher; no such directory "
                          f"'{teacher_dir}'")
    t_vocab = read_model_config(Path(teacher_dir)).get("vocab_size")
    if t_vocab != s_vocab:
        raise ConfigError(f"teacher vocab_size {t_vocab} ({teacher_dir}) != student vocab_size {s_vocab}: "
                          "distillation needs the same vocabulary")
    fingerprint = checkpoint_fingerprint(teacher_dir)
    if fingerprint != root_fp:
        raise ConfigError(f"model.path '{teacher_dir}' is not the checkpoint the student was pruned from "
                          f"(fingerprint {fingerprint[:12]} vs the plan's {root_fp[:12]})")
    return fingerprint
