"""Teacher-logit cache: run the frozen teacher once, store its top-k distribution, train the KL arm from disk.

Per supervised position the cache holds the teacher's k largest log-probabilities (at the training
temperature) and their token ids, plus the log of the remaining tail mass, so that a proper
distribution over k tokens + one tail bucket can be rebuilt. Ids are packed in 3 bytes (any vocabulary
below 2^24; OLMo2's 100352 needs 17 bits), so at k = 64 with float16 values a position costs
64*2 + 64*3 + 4 = 324 bytes, against ~200 KB for dense bf16 logits at the OLMo2 vocabulary.

Storage: safetensors shards (chosen over numpy: a header with dtypes and shapes, no pickle, the same
reader as checkpoints), each covering a contiguous slice of the *full* training split in file order,
with the sample ids in its metadata, so any data order or subsample reads the rows it needs by id.
Each shard is written to a temporary name and renamed; a sidecar JSON with its sha256 and row counts
is written after it and marks it complete. Re-running skips complete shards and redoes missing or
corrupt ones; the manifest, with the fingerprint of everything the values depend on, is written
last, once every shard is present and verified.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm.auto import tqdm

from .config import RunConfig
from .data import PROMPT_VERSION, build_train_examples, collate, load_split
from .errors import ConfigError, UserError
from .fileio import atomic_write_json, canonical_json, checkpoint_fingerprint, sha256_bytes, sha256_file
from .models import DTYPES, load_tokenizer
from .prune import ShardWriter

CACHE_FORMAT = "distill_dist.teacher_cache/v1"
MANIFEST = "manifest.json"


class CacheError(UserError):
    pass


# ---------------------------------------------------------------- fingerprint

def tokenizer_hash(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tok.get_vocab(), sort_keys=True)
    return sha256_bytes(text.encode())


def data_hash(ds) -> str:
    """Content of the normalised split (ids, questions, choices), whatever file or hub it came from."""
    rows = [[r["id"], r["question"], r["choices"]] for r in ds]
    return sha256_bytes(canonical_json(rows).encode())


def expected_fingerprint(cfg: RunConfig, teacher_fingerprint: str, tok, full_train=None) -> dict:
    """Everything the cached values depend on. `full_train` is the unsubsampled train split."""
    if full_train is None:
        full_train = load_split(_full_data(cfg), "train")
    return {
        "teacher": teacher_fingerprint,
        "tokenizer": tokenizer_hash(tok),
        "data": data_hash(full_train),
        "sample_ids": sha256_bytes(canonical_json(list(full_train["id"])).encode()),
        "prompt_version": PROMPT_VERSION,
        "max_length": cfg.data.max_length,
        "add_bos": cfg.data.add_bos,
        "positions": cfg.train.positions,
        "top_k": cfg.teacher.top_k,
        "dtype": cfg.teacher.dtype,
        "temperature": cfg.train.temperature,
    }


def _full_data(cfg: RunConfig):
    from dataclasses import replace

    return replace(cfg.data, train_examples=None)


# ---------------------------------------------------------------- computing the cache

@torch.no_grad()
def topk_rows(hidden: torch.Tensor, head, k: int, tau: float, chunk: int = 1024):
    """Top-k log-probs at temperature tau, their ids and the log tail mass, chunk by chunk over positions."""
    vals, ids, tails = [], [], []
    for i in range(0, hidden.shape[0], chunk):
        logp = torch.log_softmax(head(hidden[i: i + chunk]).float() / tau, dim=-1)
        v, ix = logp.topk(min(k, logp.shape[-1]), dim=-1)
        tails.append(torch.logsumexp(logp.scatter(1, ix, float("-inf")), dim=-1))
        vals.append(v)
        ids.append(ix)
    return torch.cat(vals), torch.cat(ids), torch.cat(tails)


def pack_ids(ids: torch.Tensor) -> torch.Tensor:
    """int ids < 2^24 -> uint8 [..., 3] little-endian."""
    ids = ids.to(torch.int64)
    return torch.stack([(ids >> s) & 0xFF for s in (0, 8, 16)], dim=-1).to(torch.uint8)


def unpack_ids(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.int64)
    return p[..., 0] | (p[..., 1] << 8) | (p[..., 2] << 16)


def shard_name(i: int, n: int) -> str:
    return f"shard-{i:05d}-of-{n:05d}.safetensors"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def shard_complete(path: Path, fp_sha: str) -> bool:
    side = _sidecar(path)
    if not path.is_file() or not side.is_file():
        return False
    meta = json.loads(side.read_text())
    return meta.get("fingerprint_sha256") == fp_sha and meta.get("sha256") == sha256_file(path)


def run_cache_teacher(cfg: RunConfig) -> dict | None:
    """`distill-dist cache-teacher`: compute missing shards (this rank's share, or teacher.shard), then
    verify all shards and write the manifest when every shard is present."""
    from .train import EXIT_PREEMPTED, STOP_REQUESTED, Preempted, _barrier, init_process_group, load_frozen_teacher

    tc, out = cfg.teacher, Path(cfg.teacher.cache_dir)
    teacher_dir = cfg.model.path
    if not teacher_dir or not Path(teacher_dir).is_dir():
        raise ConfigError(f"config field 'model.path': no such directory '{teacher_dir}' (the teacher to cache)")
    use_ds = cfg.train.deepspeed and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if use_ds:
        rank, world_size, local_rank = init_process_group(True)
    else:
        rank, world_size, local_rank = 0, 1, 0
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    tok = load_tokenizer(cfg.model.tokenizer or teacher_dir)
    full = load_split(_full_data(cfg), "train")
    # Hashing the teacher reads every byte of it: once, on rank 0, then shared.
    teacher_fp = [checkpoint_fingerprint(teacher_dir) if rank == 0 else None]
    if use_ds:
        dist.broadcast_object_list(teacher_fp, src=0)
    fp = expected_fingerprint(cfg, teacher_fp[0], tok, full)
    fp_sha = sha256_bytes(canonical_json(fp).encode())
    vocab = json.loads((Path(teacher_dir) / "config.json").read_text())["vocab_size"]
    if vocab >= 1 << 24:
        raise ConfigError(f"vocab_size {vocab} does not fit the cache's 3-byte token ids")
    examples = build_train_examples(tok, full, "kl", cfg.train.positions, cfg.data.max_length, cfg.data.add_bos)
    n_shards = tc.num_shards or math.ceil(len(examples) / tc.shard_samples)
    per_shard = math.ceil(len(examples) / n_shards)
    if tc.shard is not None and tc.shard >= n_shards:
        raise ConfigError(f"config field 'teacher.shard' = {tc.shard}: the cache has {n_shards} shards (0..{n_shards - 1})")
    if (out / MANIFEST).is_file():
        old = json.loads((out / MANIFEST).read_text())
        if old.get("fingerprint_sha256") == fp_sha and old.get("num_shards") == n_shards:
            if rank == 0:
                print(f"{out} is complete for this teacher/data/settings; nothing to do")
            return old
        raise CacheError(f"{out} holds a cache with another fingerprint ({_diff(old.get('fingerprint', {}), fp)}); "
                         "choose another teacher.cache_dir")
    out.mkdir(parents=True, exist_ok=True)
    wanted = [tc.shard] if tc.shard is not None else list(range(n_shards))
    todo = [i for i in wanted if not shard_complete(out / shard_name(i, n_shards), fp_sha)]
    mine = todo[rank::world_size]
    _barrier()  # every rank decided from the same view of the directory

    teacher = load_frozen_teacher(cfg, teacher_dir, device, use_deepspeed=use_ds)
    module = teacher.module if hasattr(teacher, "module") else teacher
    head_w = module.lm.lm_head.weight
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0

    # ZeRO-3 forwards are collective: every rank runs the same number of batches (idle ranks repeat one).
    batches = []
    for i in mine:
        rows = examples[i * per_shard: (i + 1) * per_shard]
        for b in range(0, len(rows), tc.batch_size):
            batches.append((i, rows[b: b + tc.batch_size]))
    n_batches = len(batches)
    if use_ds:
        t = torch.tensor([n_batches], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_batches = int(t.item())
    filler = (None, examples[: tc.batch_size])
    results: dict[int, list] = {i: [] for i in mine}
    t0, positions = time.time(), 0
    bar = tqdm(total=n_batches, desc=f"cache rank {rank}", unit="batch", disable=rank != 0)
    for j in range(n_batches):
        shard_i, rows = batches[j] if j < len(batches) else filler
        batch = collate(rows, pad_id, device)
        with torch.no_grad():
            hidden = teacher(**batch)
            if hasattr(head_w, "ds_id"):  # ZeRO-3: gather the sharded LM head for this batch
                import deepspeed

                with deepspeed.zero.GatheredParameters([head_w], modifier_rank=None):
                    v, ix, tail = topk_rows(hidden, lambda h: torch.nn.functional.linear(h, head_w), tc.top_k,
                                            cfg.train.temperature)
            else:
                v, ix, tail = topk_rows(hidden, module.lm.lm_head, tc.top_k, cfg.train.temperature)
        if shard_i is not None:
            results[shard_i].append((rows, v.cpu(), ix.cpu(), tail.cpu()))
            positions += v.shape[0]
            if sum(len(r[0]) for r in results[shard_i]) == len(examples[shard_i * per_shard: (shard_i + 1) * per_shard]):
                _write_shard(out, shard_i, n_shards, results.pop(shard_i), tc.dtype, fp_sha)
                if not use_ds and STOP_REQUESTED["flag"]:  # preempted: complete shards stay, the rest is redone
                    bar.close()
                    print(f"stop signal: shard {shard_i} written; exiting with {EXIT_PREEMPTED} for requeue")
                    raise Preempted()
        bar.update(1)
    bar.close()
    elapsed = time.time() - t0
    if positions:
        print(f"rank {rank}: cached {positions} positions in {len(mine)} shard(s), {positions / elapsed:.0f} positions/s")
    _barrier()
    if rank == 0:
        return finalize(out, n_shards, fp, fp_sha, vocab, len(examples))
    return None


def _write_shard(out: Path, i: int, n: int, parts: list, dtype: str, fp_sha: str) -> None:
    rows = [r for p in parts for r in p[0]]
    values = torch.cat([p[1] for p in parts]).to(DTYPES[dtype]).contiguous()
    ids = pack_ids(torch.cat([p[2] for p in parts])).contiguous()
    tail = torch.cat([p[3] for p in parts]).to(torch.float32).contiguous()
    offsets = torch.tensor([0] + [len(r["positions"]) for r in rows], dtype=torch.int64).cumsum(0)
    path = out / shard_name(i, n)
    tensors = {"ids": ids, "log_tail": tail, "logprobs": values, "offsets": offsets}
    # Our own writer, not safetensors.save_file: its metadata order varies between processes, and a
    # resumed cache must equal a one-shot one byte for byte. It writes .tmp and renames.
    writer = ShardWriter(out, [(k, t.dtype, list(t.shape)) for k, t in tensors.items()], 1 << 62, names=[path.name],
                         metadata={"fingerprint_sha256": fp_sha, "sample_ids": json.dumps([r["id"] for r in rows])})
    for k, t in tensors.items():
        writer.write(k, t)
    writer.finish()
    atomic_write_json(_sidecar(path), {"sha256": sha256_file(path), "rows": int(values.shape[0]), "samples": len(rows),
                                       "fingerprint_sha256": fp_sha})


def finalize(out: Path, n_shards: int, fp: dict, fp_sha: str, vocab: int, n_samples: int, log=print) -> dict | None:
    shards, missing = [], []
    for i in range(n_shards):
        path = out / shard_name(i, n_shards)
        if not shard_complete(path, fp_sha):
            missing.append(i)
            continue
        meta = json.loads(_sidecar(path).read_text())
        shards.append({"file": path.name, "sha256": meta["sha256"], "rows": meta["rows"], "samples": meta["samples"]})
    if missing:
        log(f"{n_shards - len(missing)} of {n_shards} shards complete (missing: {missing[:10]}"
              f"{'...' if len(missing) > 10 else ''}); the manifest is written once all are")
        return None
    rows = sum(s["rows"] for s in shards)
    size = sum((out / s["file"]).stat().st_size for s in shards)
    manifest = {"format": CACHE_FORMAT, "fingerprint": fp, "fingerprint_sha256": fp_sha, "vocab_size": vocab,
                "num_shards": n_shards, "num_samples": n_samples, "num_positions": rows, "bytes": size,
                "bytes_per_position": size / max(rows, 1), "shards": shards}
    atomic_write_json(out / MANIFEST, manifest)
    log(f"teacher cache complete: {out} ({n_samples} samples, {rows} positions, {size / 1e6:.1f} MB, "
          f"{size / max(rows, 1):.0f} bytes/position)")
    return manifest


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: cache {_short(old.get(k))} vs run {_short(new.get(k))}" for k in keys) or "format"


def _short(v) -> str:
    s = str(v)
    return s[:12] if len(s) == 64 else s


# ---------------------------------------------------------------- reading the cache

class TeacherCache:
    """The cache as the KL arm reads it: verified shards, rows looked up by sample id."""

    def __init__(self, root: Path, manifest: dict, tensors: dict[str, tuple]):
        self.root, self.manifest, self._by_id = root, manifest, tensors

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
        if manifest.get("format") != CACHE_FORMAT:
            raise CacheError(f"{root / MANIFEST}: format {manifest.get('format')!r}, expected {CACHE_FORMAT}")
        by_id = {}
        for s in manifest["shards"]:
            path = root / s["file"]
            if not path.is_file():
                raise CacheError(f"{path}: shard missing from the cache")
            if sha256_file(path) != s["sha256"]:
                raise CacheError(f"{path}: checksum mismatch (corrupt shard); delete it and re-run cache-teacher")
            t = load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                ids = json.loads(f.metadata()["sample_ids"])
            off = t["offsets"]
            for j, sid in enumerate(ids):
                a, b = int(off[j]), int(off[j + 1])
                by_id[sid] = (t["logprobs"][a:b], unpack_ids(t["ids"][a:b]), t["log_tail"][a:b])
        return cls(root, manifest, by_id)

    def check(self, expected: dict, sample_ids: list[str]) -> None:
        """Refuse a cache made for another teacher / tokenizer / data / prompt / k / dtype / temperature."""
        if self.manifest["fingerprint"] != expected:
            raise CacheError(f"teacher cache {self.root} does not match this run: {_diff(self.manifest['fingerprint'], expected)}")
        missing = [s for s in sample_ids if s not in self._by_id]
        if missing:
            raise CacheError(f"teacher cache {self.root} lacks {len(missing)} training samples (e.g. {missing[0]})")

    def lookup(self, rows: list[dict], device) -> tuple:
        """(logprobs [N, k] float32, ids [N, k], log_tail [N]) for the rows' positions, in collate order."""
        parts = [self._by_id[r["id"]] for r in rows]
        for r, p in zip(rows, parts):
            if p[0].shape[0] != len(r["positions"]):
                raise CacheError(f"teacher cache {self.root}: sample {r['id']} has {p[0].shape[0]} positions, "
                                 f"the run needs {len(r['positions'])}")
        return tuple(torch.cat([p[k] for p in parts]).to(device) for k in range(3))
