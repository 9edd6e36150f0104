"""Calibration statistics of MLP neurons, measured where the model lives: what prune.score=activation, wanda
and taylor read (their formulas: prune.neuron_scores).

Texts: `prune.calibration` = `train` (the training split's prompts in `data.format`, as data.py formats them
for evaluation and training) or a jsonl file with one {"text": ...} per line; the first
`prune.calibration_samples` texts in file order, no sampling (so no seed, and any other tool reads the very
same texts). Each is encoded with the model's tokenizer as lm-eval encodes a request (`data.add_bos`) and
cut to its first `data.max_length` tokens. The plan records their sha256, count and token count.

Statistics: a forward pre-hook on every layer's down_proj sees its input, the intermediate activation
a = act(gate x) * (up x) [batch, seq, I], and adds per neuron over the non-padding tokens, in float64,
sum |a|, sum a^2 and, for taylor, sum a * dL/da: the input embeddings then require grad and L, the mean
next-token cross-entropy over all calibration tokens (each batch adds its share, sum of its NLL / all
positions, so batching and sharding do not change L), is back-propagated through the frozen model
(the fused loss: no [tokens, vocab] logits).

Where: the teacher cache's ZeRO-3 inference engine (engines.teacher_engine), so a 7B model is never whole on
one rank. Under torchrun each rank reads a contiguous slice of the texts; every rank runs the same number
of forwards and backwards (ZeRO-3 gathers parameters collectively in both; a rank out of texts repeats the
first batch with its hooks off) and the sums are added across ranks through runtime.all_reduce. Without
a launcher it is a world of one and the same code.
"""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from . import runtime
from .config import RunConfig
from .data import collate, lmeval_encoder, load_full_train, pad_token_id, prompt_and_targets
from .errors import ConfigError, DataError
from .fileio import canonical_json, sha256_bytes
from .models import load_tokenizer

STATS = ("abs_sum", "sq_sum", "taylor_sum")


@dataclass(frozen=True)
class CalibrationText:
    """The encoded calibration texts (every rank holds all of them) and what identifies them in a plan."""
    ids: list[list[int]]
    describe: dict


@dataclass
class CalibrationStats:
    """Per layer and neuron, sums over every calibration token ([layers, I] float64 each)."""
    abs_sum: torch.Tensor
    sq_sum: torch.Tensor
    taylor_sum: torch.Tensor | None  # only when a score needs the gradient
    tokens: int
    describe: dict

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.abs_sum.shape)

    def layer(self, i: int) -> dict:
        """One layer's sums, as prune.neuron_scores reads them."""
        return {"abs_sum": self.abs_sum[i], "sq_sum": self.sq_sum[i], "tokens": self.tokens,
                "taylor_sum": None if self.taylor_sum is None else self.taylor_sum[i]}


# ---------------------------------------------------------------- the texts

def read_texts(cfg: RunConfig) -> tuple[list[str], str]:
    """The first prune.calibration_samples texts and the kind of source; a missing file, a bad line or too
    few texts is one line naming the field or the file."""
    p, n = cfg.prune, cfg.prune.calibration_samples
    if p.calibration == "train":
        texts = [prompt_and_targets(r, cfg.data.format)[0] for r in load_full_train(cfg.data)]
        where, kind = f"the training split of {cfg.data.path}", "train"
    else:
        path = Path(p.calibration)
        if not path.is_file():
            raise ConfigError(f"config field 'prune.calibration': no such file '{path}' (expected train or a jsonl "
                              "file with one {\"text\": ...} per line)")
        texts, where, kind = _read_jsonl_texts(path, n), str(path), "jsonl"
    if len(texts) < n:
        raise ConfigError(f"config field 'prune.calibration_samples' = {n}: {where} has only {len(texts)} texts")
    return texts[:n], kind


def _read_jsonl_texts(path: Path, n: int) -> list[str]:
    """Up to n texts from the top of the file (the rest is never read)."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if len(texts) == n:
                break
            if not line.strip():
                continue
            try:
                text = json.loads(line).get("text") if line.lstrip().startswith("{") else None
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(text, str) or not text:
                raise DataError(f"{path} line {lineno}: expected an object with a non-empty string field 'text'")
            texts.append(text)
    return texts


def prepare(cfg: RunConfig, tok) -> CalibrationText:
    """Texts -> token ids and the plan's record of them (cheap: no model). Run it on one rank."""
    texts, kind = read_texts(cfg)
    encode = lmeval_encoder(tok, cfg.data.add_bos)
    ids = [x[: cfg.data.max_length] for x in encode(texts)]
    empty = next((i for i, x in enumerate(ids) if not x), None)
    if empty is not None:
        raise DataError(f"calibration text {empty} encodes to no tokens")
    return CalibrationText(ids, {"source": kind, "samples": len(texts),
                                 "texts_sha256": sha256_bytes(canonical_json(texts).encode()),
                                 "tokens": sum(map(len, ids)), "max_length": cfg.data.max_length,
                                 "add_bos": cfg.data.add_bos})


# ---------------------------------------------------------------- the pass

class _Hooks:
    """Forward pre-hooks on every down_proj that add this rank's sums while `active`."""

    def __init__(self, lm, need_grad: bool):
        layers = lm.model.layers
        inter = lm.config.intermediate_size
        self.sums = torch.zeros(3 if need_grad else 2, len(layers), inter, dtype=torch.float64)
        self.mask: torch.Tensor | None = None
        self.active = False
        self.handles = [layer.mlp.down_proj.register_forward_pre_hook(partial(self._forward, i))
                        for i, layer in enumerate(layers)]
        if need_grad:  # the frozen model then builds a graph from its embeddings on: dL/da exists
            self.handles.append(lm.model.embed_tokens.register_forward_hook(lambda m, i, out: out.requires_grad_(True)))

    def _forward(self, layer: int, module, args) -> None:
        if not self.active:
            return
        a = args[0].detach()
        sel = a[self.mask].double()
        self.sums[0, layer] += sel.abs().sum(0)
        self.sums[1, layer] += sel.square().sum(0)
        if args[0].requires_grad:
            args[0].register_hook(partial(self._backward, layer, a, self.mask))

    def _backward(self, layer: int, a: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor) -> None:
        if self.active:
            self.sums[2, layer] += (a[mask].double() * grad[mask].double()).sum(0)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _rows(ids: list[list[int]]) -> list[dict]:
    """Training-style rows: every position but the last predicts the next token (taylor's labels)."""
    return [{"input_ids": x, "positions": list(range(len(x) - 1)), "labels": x[1:]} for x in ids]


def measure(cfg: RunConfig, calib: CalibrationText, need_grad: bool) -> CalibrationStats:
    """Sums over this rank's slice of the texts, added across ranks (every rank returns the totals)."""
    from .engines import destroy, teacher_engine

    rt, bs = runtime.get(), cfg.prune.calibration_batch_size
    rows = _rows(calib.ids)
    mine = rows[rt.rank * len(rows) // rt.world_size: (rt.rank + 1) * len(rows) // rt.world_size]
    batches = [mine[b: b + bs] for b in range(0, len(mine), bs)]
    n_batches = int(runtime.all_reduce([len(batches)], "max")[0])
    positions = sum(len(r["positions"]) for r in rows)
    tok_pad = pad_token_id(load_tokenizer(cfg.model.tokenizer or cfg.model.path))
    engine = teacher_engine(cfg.model.path, cfg)
    hooks = _Hooks(engine.module.lm, need_grad)
    try:
        for j in range(n_batches):
            hooks.active = j < len(batches)
            batch = collate(batches[j] if hooks.active else rows[:bs], tok_pad, rt.device)
            hooks.mask = batch["attention_mask"].bool()
            _forward_backward(engine, batch, need_grad, len(batch["rows"]) / max(positions, 1), cfg.train.chunk_size)
    finally:
        hooks.remove()
        destroy(engine)  # its shards go before rank 0 streams the checkpoint (DeepSpeed would keep it alive)
        del engine
        gc.collect()
    total = torch.tensor(runtime.all_reduce(hooks.sums.flatten().tolist()), dtype=torch.float64)
    total = total.view_as(hooks.sums)
    return CalibrationStats(total[0], total[1], total[2] if need_grad else None, calib.describe["tokens"],
                            calib.describe)


def _forward_backward(engine, batch: dict, need_grad: bool, share: float, chunk_size: int) -> None:
    """One forward of the frozen model; for taylor also the backward of this batch's share of L
    (mean NLL of its positions x its fraction of all positions), under the gathered LM head."""
    from contextlib import nullcontext

    from .losses import LossSpec, fused_linear_loss

    if not need_grad:
        with torch.no_grad():
            engine(**batch)
        return
    with torch.enable_grad():
        # The module, not the engine: an engine's forward hooks its outputs' backward into the optimizer's
        # accumulation (which an inference engine has not); ZeRO-3's parameter gathering in forward and
        # backward are hooks on the modules themselves, so they run all the same.
        hidden = engine.module(**batch)
        head = engine.module.lm.lm_head.weight
        gather = nullcontext()
        if hasattr(head, "ds_id"):  # ZeRO-3: every rank gathers the head, once per batch
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([head], modifier_rank=None)
        with gather:
            loss = fused_linear_loss(hidden, head.detach(), LossSpec("ce"), labels=batch["labels"],
                                     chunk_size=chunk_size) * share
            loss.backward()


# ---------------------------------------------------------------- the calibrated pruning stage

def prune_calibrated(cfg: RunConfig, ratio: float, tokenizer=None) -> dict:
    """`distill-dist prune` with a calibration score: texts (rank 0), statistics (every rank, sharded), then
    rank 0 streams the checkpoint as for L2 scores. A re-run of the same pruning does nothing, before
    any model is loaded; every refusal is one line on every rank."""
    from .prune import existing_pruning, prune_checkpoint

    p = cfg.prune
    runtime.init(cfg.train.pg_timeout_minutes, cfg.train.io_timeout_minutes)
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    calib = runtime.decide_on_main(lambda: prepare(cfg, tok))
    settings = {"keep_ratio": ratio, "score": p.score, "round_to": p.round_to, "calibration": calib.describe}
    done = runtime.decide_on_main(lambda: existing_pruning(Path(cfg.model.path), Path(p.output_dir), settings,
                                                           None, p.overwrite))
    if done is not None:
        if runtime.get().is_main:
            print(f"{p.output_dir} already holds this pruning (plan {done['plan_sha256'][:12]}); nothing to do")
        return done
    stats = measure(cfg, calib, need_grad=p.score == "taylor")
    # Rank 0 streams the whole checkpoint (minutes at 7B): the others wait under the I/O timeout.
    return runtime.decide_on_main(lambda: prune_checkpoint(cfg.model.path, p.output_dir, ratio, p.score, p.round_to,
                                                           p.max_shard_mb, tokenizer=tokenizer,
                                                           overwrite=p.overwrite, calibration=stats), slow=True)
