"""Layer-wise structured pruning of gated MLP neurons -> a smaller *standard* checkpoint.

Neuron j of a layer's MLP is row j of gate_proj and up_proj and column j of down_proj; removing it
removes all three, so the result is the same architecture with a smaller `intermediate_size`.
Every layer keeps the same count ceil(r * I) (rounded up to `round_to`), those with the largest score
(`neuron_scores`: three L2 norms of weights, the paper's baseline, and three scores that read the
neuron's activation a_j on calibration text, gathered by calibrate.py).

The checkpoint is streamed: pass 1 reads only the MLP tensors to score neurons; pass 2 reads each
shard sequentially (hashing it for the source fingerprint), slices, and writes output shards of at
most `max_shard_mb`. Peak memory is about one output shard plus one tensor, so a 7B bf16 model
(14.6 GB) prunes on a machine with far less RAM than the model.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from .config import CALIBRATION_SCORES
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_json, canonical_json, replace_dir, sha256_bytes, sha256_file
from .hf_checkpoint import (CONTENT_HASH_FILE, IMPORT_FILE, PLAN_FILE, PLAN_FORMAT, ST_DTYPES, ShardWriter,
                            checkpoint_fingerprint, index_checkpoint, plan_hash, read_model_config, read_tensor,
                            stream_shard)
from .models import MLP_PROJ, mlp_weight_name

# the hash and the import record describe the source, not its pruned copy
_NON_COPIED = {"config.json", "model.safetensors.index.json", PLAN_FILE, CONTENT_HASH_FILE, IMPORT_FILE}


# ---------------------------------------------------------------- neuron selection (pure functions)

def keep_count(intermediate_size: int, keep_ratio: float, round_to: int = 1) -> int:
    k = math.ceil(keep_ratio * intermediate_size - 1e-9)
    k = int(math.ceil(k / round_to) * round_to)
    return max(1, min(intermediate_size, k))


def neuron_scores(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, score: str,
                  calibration: dict | None = None) -> torch.Tensor:
    """Per-neuron importance in float64; gate/up are [I, H], down is [H, I]. Higher = kept.

    a_tj = act(gate_j . x_t) * (up_j . x_t) is neuron j's intermediate activation (down_proj's input) at
    calibration token t; `calibration` holds this layer's sums over the T calibration tokens (calibrate.py):
    abs_sum = sum_t |a_tj|, sq_sum = sum_t a_tj^2, taylor_sum = sum_t a_tj dL/da_tj, tokens = T.

    - gate_up_down: ||[gate_j, up_j, down_:,j]||_2, the neuron's whole weight footprint (the paper's L2);
    - gate_up: ||[gate_j, up_j]||_2 (how strongly it reads the residual stream); down: ||down_:,j||_2;
    - activation: mean_t |a_tj| (Minitron, Muralidharan et al. 2024, "Compact Language Models via
      Pruning and Knowledge Distillation": mean activation magnitude of the MLP neuron);
    - wanda: ||down_:,j||_2 * ||a_:j||_2 with ||a_:j||_2 = sqrt(sum_t a_tj^2). Wanda (Sun et al. 2024)
      scores a weight W_ij by |W_ij| * ||X_j||_2 with X_j the weight's input feature over the calibration
      tokens; for neuron j the inputs of down_proj's column j are a_:j, and the L2 aggregate over the column,
      sqrt(sum_i (|W_ij| ||a_:j||_2)^2), is this product. It equals ||down_:,j a_:j^T||_F, the size of
      everything neuron j adds to the MLP output over the calibration text, i.e. what cutting it removes;
    - taylor: |sum_t a_tj dL/da_tj| with L the mean next-token cross-entropy over the calibration text:
      the first-order change of the loss when a_:j is set to zero (LLM-Pruner, Ma et al. 2023, element-wise
      first order, summed over the neuron's tokens before the absolute value).
    """
    def sq(w: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.linalg.vector_norm(w.double(), dim=dim) ** 2

    if score in CALIBRATION_SCORES:
        if calibration is None:
            raise ValueError(f"score {score!r} needs calibration statistics")
        if score == "activation":
            return calibration["abs_sum"].double() / calibration["tokens"]
        if score == "wanda":
            return sq(down, 0).sqrt() * calibration["sq_sum"].double().sqrt()
        return calibration["taylor_sum"].double().abs()
    if score == "gate_up_down":
        s = sq(gate, 1) + sq(up, 1) + sq(down, 0)
    elif score == "gate_up":
        s = sq(gate, 1) + sq(up, 1)
    elif score == "down":
        s = sq(down, 0)
    else:
        raise ValueError(f"unknown score {score!r}")
    return s.sqrt()


def select_neurons(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k largest scores, ties broken by lower index, returned in ascending order."""
    order = torch.argsort(scores, descending=True, stable=True)[:k]
    return sorted(order.tolist())


# ---------------------------------------------------------------- the pruning stage

def _mlp_parts(name: str) -> list[str] | None:
    """['model', 'layers', i, 'mlp', proj, 'weight'|'bias'] for a gated-MLP tensor name, else None."""
    parts = name.split(".")
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and parts[3] == "mlp" and parts[4] in MLP_PROJ:
        return parts
    return None


def _pruned_shape(name: str, shape: list[int], k: int) -> list[int]:
    """gate/up weight [I, H] and bias [I] keep k rows; down weight [H, I] keeps k columns; its bias stays."""
    parts = _mlp_parts(name)
    if not parts:
        return list(shape)
    if parts[4] in ("gate_proj", "up_proj"):
        return [k] + list(shape[1:])
    return [shape[0], k] if parts[5] == "weight" else list(shape)


def _source_identity(src: Path) -> list:
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(src.iterdir())
            if p.is_file() and (p.suffix == ".safetensors" or p.name == "config.json")]


def prune_checkpoint(src: str | os.PathLike, out: str | os.PathLike, keep_ratio: float, score: str = "gate_up_down",
                     round_to: int = 1, max_shard_mb: int = 2000, tokenizer=None, overwrite: bool = False,
                     log=print, keep: int | None = None, calibration=None) -> dict:
    """Prune `src` into a new checkpoint dir `out`; returns the plan (also written to out/pruning_plan.json).

    `keep` fixes the neuron count per layer directly (iterative schedules count against the original size).
    `calibration` (calibrate.CalibrationStats, for the activation/wanda/taylor scores) supplies the
    per-neuron activation statistics; the plan records what describes it (text hash, count, tokens).
    """
    src, out = Path(src), Path(out)
    settings = {"keep_ratio": keep_ratio, "score": score, "round_to": round_to}
    if calibration is not None:
        settings["calibration"] = calibration.describe
    elif score in CALIBRATION_SCORES:
        raise ConfigError(f"config field 'prune.calibration' = None: prune.score={score} reads activations on "
                          "calibration text (train, or a jsonl path)")
    done = existing_pruning(src, out, settings, keep, overwrite)
    if done is not None:
        log(f"{out} already holds this pruning (plan {done['plan_sha256'][:12]}); nothing to do")
        return done
    t0 = time.time()
    mcfg = read_model_config(src)
    inter = mcfg["intermediate_size"]
    k = keep if keep is not None else keep_count(inter, keep_ratio, round_to)
    if keep is None and keep_ratio < 1 and k == inter:
        raise ConfigError(f"config field 'prune.round_to' = {round_to}: keep ratio {keep_ratio} of {inter} MLP neurons "
                          f"rounds up to all {inter}, which prunes nothing; lower prune.round_to or the keep ratio")
    if not 0 < k <= inter:
        raise CheckpointError(f"cannot keep {k} of {inter} MLP neurons per layer")
    shards = index_checkpoint(src)
    kept, bytes_scored = _score_neurons(src, mcfg, shards, score, k, calibration)
    t_score = time.time() - t0

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    stats = _write_pruned(src, tmp, shards, kept, k, max_shard_mb)
    atomic_write_json(tmp / "config.json", dict(mcfg, intermediate_size=k))
    for p in sorted(src.iterdir()):  # generation config, tokenizer files, ...
        if p.is_file() and p.suffix != ".safetensors" and p.name not in _NON_COPIED and not p.name.startswith("."):
            shutil.copy2(p, tmp / p.name)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    plan = _make_plan(src, mcfg, settings, kept, stats)
    atomic_write_json(tmp / PLAN_FILE, plan)
    replace_dir(tmp, out)

    wall = time.time() - t0
    plan["_stats"] = {"wall_s": wall, "score_s": t_score, "bytes_read": bytes_scored + stats["bytes_read"],
                      "bytes_written": stats["bytes_written"]}
    before, after = plan["params"]["total_before"], plan["params"]["total_after"]
    log(f"pruned {src} -> {out}: intermediate {inter} -> {k} per layer, params {before:,} -> "
        f"{after:,} ({after / before:.1%}), plan {plan['plan_sha256'][:12]}, {wall:.1f}s")
    return plan


def existing_pruning(src: Path, out: Path, settings: dict, keep: int | None, overwrite: bool) -> dict | None:
    """The plan already at `out` when it is this very pruning (idempotent re-runs); refuses to clobber others.
    `settings` = keep_ratio, score, round_to (and the calibration's record): what the plan stores."""
    if out.resolve() == src.resolve():
        raise CheckpointError(f"prune.output_dir {out} is the source checkpoint; choose another directory")
    if (out / PLAN_FILE).is_file():
        old = json.loads((out / PLAN_FILE).read_text())
        same = (old.get("provenance", {}).get("source_identity") == _source_identity(src)
                and all(old.get(k) == v for k, v in settings.items())
                and (keep is None or old.get("intermediate_size_after") == keep))
        if same and not overwrite:
            return old
        if not overwrite:
            raise CheckpointError(f"{out} already holds a different pruning (plan {old.get('plan_sha256', '?')[:12]}); "
                                  "choose another prune.output_dir or set prune.overwrite=true")
    elif out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out} exists and is not a pruned checkpoint; choose another prune.output_dir "
                              "(or set prune.overwrite=true to replace it)")
    return None


def _score_neurons(src: Path, mcfg: dict, shards: dict, score: str, k: int,
                   calibration=None) -> tuple[list[list[int]], int]:
    """Pass 1: the kept neurons of every layer, one layer's three matrices in memory at a time."""
    by_name = {e.name: e for entries in shards.values() for e in entries}
    n_layers = mcfg["num_hidden_layers"]
    for layer in range(n_layers):
        for proj in MLP_PROJ:
            if mlp_weight_name(layer, proj) not in by_name:
                raise CheckpointError(
                    f"{src}: tensor {mlp_weight_name(layer, proj)} not found; architecture "
                    f"{mcfg['architectures'][0]} has no gated MLP (gate_proj/up_proj/down_proj)")
    if calibration is not None and calibration.shape != (n_layers, mcfg["intermediate_size"]):
        raise CheckpointError(f"{src}: calibration statistics are {list(calibration.shape)} (layers, neurons), the "
                              f"checkpoint has {n_layers} x {mcfg['intermediate_size']}")
    kept, bytes_read = [], 0
    for layer in range(n_layers):
        entries = [by_name[mlp_weight_name(layer, p)] for p in MLP_PROJ]
        g, u, d = (read_tensor(e) for e in entries)
        bytes_read += sum(e.end - e.begin for e in entries)
        stats = calibration.layer(layer) if calibration is not None else None
        kept.append(select_neurons(neuron_scores(g, u, d, score, stats), k))
        del g, u, d
    return kept, bytes_read


def _write_pruned(src: Path, tmp: Path, shards: dict, kept: list[list[int]], k: int, max_shard_mb: int) -> dict:
    """Pass 2: stream every shard once, slice the MLP tensors, write new shards; counts and content hashes."""
    layout = [(e.name, ST_DTYPES.get(e.dtype, torch.uint8), _pruned_shape(e.name, e.shape, k))
              for entries in shards.values() for e in entries]
    writer = ShardWriter(tmp, layout, max_shard_mb * 1024 * 1024)
    stats = {"file_hashes": {}, "total_before": 0, "total_after": 0, "mlp_before": 0, "mlp_after": 0, "bytes_read": 0}
    index_tensors = [torch.tensor(ix, dtype=torch.long) for ix in kept]
    for shard_name, entries in shards.items():
        h = hashlib.sha256()
        for e, t in stream_shard(src / shard_name, entries, h):
            stats["bytes_read"] += e.end - e.begin
            stats["total_before"] += t.numel()
            parts = _mlp_parts(e.name)
            if parts:
                stats["mlp_before"] += t.numel()
                ix = index_tensors[int(parts[2])]
                # gate/up weight [I, H] and bias [I] lose rows; down weight [H, I] loses columns, its bias stays.
                if parts[4] in ("gate_proj", "up_proj"):
                    t = t.index_select(0, ix)
                elif parts[5] == "weight":
                    t = t.index_select(1, ix)
                stats["mlp_after"] += t.numel()
            stats["total_after"] += t.numel()
            writer.write(e.name, t)
        stats["file_hashes"][shard_name] = h.hexdigest()
    writer.finish()
    stats["bytes_written"] = writer.bytes_written
    return stats


def _make_plan(src: Path, mcfg: dict, settings: dict, kept: list[list[int]], stats: dict) -> dict:
    # The id later stages compare (cheap: headers, sizes, sampled content, config); the full content hash
    # of what was read comes free with the streaming pass and is recorded too.
    source_fp = checkpoint_fingerprint(src)
    entries = [("config.json", sha256_file(src / "config.json"))] + sorted(stats["file_hashes"].items())
    # The unpruned model at the root of a chain of prunes (iterative schedules prune pruned students):
    # the teacher a KL arm must distil from.
    src_plan = src / PLAN_FILE
    root_fp = json.loads(src_plan.read_text()).get("root_fingerprint", source_fp) if src_plan.is_file() else source_fp
    plan = {
        "format": PLAN_FORMAT, "source_fingerprint": source_fp,
        "source_content_sha256": sha256_bytes(canonical_json([list(e) for e in entries]).encode()),
        "root_fingerprint": root_fp, "architecture": mcfg["architectures"][0],
        "num_layers": mcfg["num_hidden_layers"], "hidden_size": mcfg["hidden_size"],
        "intermediate_size_before": mcfg["intermediate_size"], "intermediate_size_after": len(kept[0]),
        **settings, "kept_indices": kept,
        "params": {k: stats[k] for k in ("total_before", "total_after", "mlp_before", "mlp_after")},
        "provenance": {"source_path": str(src), "source_identity": _source_identity(src),
                       "created_unix": int(time.time())},
    }
    plan["plan_sha256"] = plan_hash(plan)
    return plan
