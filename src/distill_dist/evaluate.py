"""CommonsenseQA accuracy and uncertainty by log-likelihood of the five choices' continuations.

Each question's loglik of its five targets after the prompt is computed from exactly the tokens that
lm-eval-harness feeds the model (`data.encode_choices`: its context/continuation split of the joint
encoding, its BOS rule; `build_requests`: its left truncation), in `data.format` mc (lm-eval's
`commonsense_qa`: the letters " A".." E") or cloze (OLMES's rank classification: " " + each answer text;
see data.py). The torch backend reads a question's prompt once: one packed row holds the prompt and each
choice's continuation as a block that sees the prompt and itself only (`packed_questions`, packing.py),
so each choice is scored on exactly its lm-eval input without the prompt being re-read five times. The
llama.cpp backend scores `build_requests`' sequences (one per choice, or one for five one-token targets).
Only the positions that score a target go through `lm_head`, so a 100k-wide vocabulary costs a few rows
per choice, not the whole sequence. With several ranks, each scores its share of the questions and rank 0
gathers them.

Accuracies (`ACCURACIES`), side by side, as OLMES defines them (oe_eval's MCAccuracy, where they are
acc_raw, acc_per_token and acc_per_char; arXiv 2406.08446 sec. 3): `acc` ranks the choices by summed log-likelihood, `acc_per_token` by it over
the continuation's token count, `acc_per_char` over its character count (the continuation string,
leading space included). The headline (`HEADLINE`) is `acc` for mc (lm-eval's metric) and
`acc_per_char` for cloze: OLMES's per-character normalisation, its primary metric for RC tasks such as
ARC-Easy. For CSQA itself OLMES's primary metric is PMI (`acc_uncond` in its task config
`csqa:rc::olmes`: the loglik minus that of the answer after "Answer:" alone, 5-shot), not computed here.
NLL, Brier, ECE, entropy and each example's probs/pred come from the headline's choice distribution:
softmax over the five choices of the headline's scores (for acc_per_char: loglik / characters), so an
example's pred is right exactly when it counts for the headline.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .data import (LABELS, PROMPT_VERSION, collate, continuation_strings, encode_rows, load_split, pad_token_id,
                   prompt_and_targets)
from .fileio import atomic_write_json, atomic_write_jsonl, dir_bytes
from .hf_checkpoint import checkpoint_fingerprint
from .packing import body_hidden, pack_choices, prompt_cut
from .progress import progress_bar

ECE_BINS = 15
# accuracy: what the summed continuation log-likelihood is divided by before the argmax, and in words
ACCURACIES = {"acc": (None, "unnormalised log-likelihood"),
              "acc_per_token": ("tokens", "log-likelihood per continuation token"),
              "acc_per_char": ("chars", "log-likelihood per character of the continuation, OLMES")}
HEADLINE = {"mc": "acc", "cloze": "acc_per_char"}  # data.format -> the accuracy it is judged by


@dataclass
class _Request:
    example: int
    choice: int | None  # None: one sequence scores all five single-token targets
    input_ids: list[int]
    positions: list[int]
    targets: list[int]  # choice is None: the five target ids at positions[0]; else the target per position


def build_requests(tokenizer, rows, max_length: int, add_bos="auto", fmt: str = "mc") -> list[_Request]:
    """lm-eval's model inputs: (context + continuation)[-(max_length + 1):][:-1], scored on the continuation;
    what the llama.cpp backend scores, and per choice what a packed row reads (`packed_questions`).

    With one-token continuations that input is the context's last max_length ids for every choice,
    so the five share one request scored at its last position.
    """
    reqs = []
    for i, (ctx, conts) in enumerate(encode_rows(tokenizer, rows, fmt, add_bos)):
        if all(len(c) == 1 for c in conts):
            ids = ctx[-max_length:]
            reqs.append(_Request(i, None, ids, [len(ids) - 1], [c[0] for c in conts]))
        else:
            for j, cont in enumerate(conts):
                ids = (ctx + cont)[-(max_length + 1):][:-1]
                start = len(ids) - len(cont)
                reqs.append(_Request(i, j, ids, list(range(start, len(ids))), cont))
    return reqs


@dataclass
class _Question:
    """Choices of one question that share a prompt, packed in one row (`packing.pack_choices`)."""
    example: int
    choices: list[int]
    row: dict  # collate's row: input_ids, blocks, positions (from the prompt's last position to the row's end)
    at: list[list[int]]  # per choice: indices into row["positions"] of the positions predicting its ids
    targets: list[list[int]]  # per choice: its continuation ids


def packed_questions(tokenizer, rows, max_length: int, add_bos="auto", fmt: str = "mc") -> list[_Question]:
    """The torch backend's rows: a question's prompt once, each choice's continuation a block after it.

    Read per choice, a row holds exactly `build_requests`' (lm-eval's) input for that choice. Choices share
    a row when lm-eval's left truncation leaves them the same prompt: always, unless some prompt +
    continuation exceeds max_length, and then the choices cut alike share one."""
    out = []
    for i, (ctx, conts) in enumerate(encode_rows(tokenizer, rows, fmt, add_bos)):
        groups: dict[int, list[int]] = {}
        for j, cont in enumerate(conts):
            groups.setdefault(prompt_cut(ctx, cont, max_length), []).append(j)
        for choices in groups.values():
            packed = pack_choices(ctx, [conts[j] for j in choices], max_length, f"question {rows[i]['id']}")
            row = {k: packed[k] for k in ("input_ids", "blocks", "positions")}
            first = row["positions"][0]  # the prompt's last position
            out.append(_Question(i, choices, row, [[p - first for p in ps] for ps in packed["predicts"]],
                                 [conts[j] for j in choices]))
    return out


@torch.inference_mode()
def choice_logprobs(model, batch: list[_Question], pad_id: int, device) -> list[list[torch.Tensor]]:
    """Per question of the batch, per choice: log p of each continuation id, float32. The LM head runs at the
    scored positions only, and only the target columns leave the device."""
    b = collate([q.row for q in batch], pad_id, device)
    hidden = body_hidden(model, b["input_ids"], b["attention_mask"], b.get("position_ids"))
    logp = torch.log_softmax(model.lm_head(hidden[b["rows"], b["cols"]]).float(), dim=-1)
    at, targets, k = [], [], 0
    for q in batch:
        for idx, ids in zip(q.at, q.targets):
            at += [k + x for x in idx]
            targets += ids
        k += len(q.row["positions"])
    picked = logp[torch.tensor(at, device=logp.device), torch.tensor(targets, device=logp.device)].cpu()
    per_choice = iter(picked.split([len(ids) for q in batch for ids in q.targets]))
    return [[next(per_choice) for _ in q.choices] for q in batch]


def fill_logliks(logliks: np.ndarray, r: _Request, logp: np.ndarray) -> None:
    """A llama.cpp request's target log-probs into the [questions, 5] table: the five choices at once, or one
    choice's continuation (the sum over its tokens)."""
    if r.choice is None:
        logliks[r.example] = logp
    else:
        logliks[r.example, r.choice] = float(logp.sum())


def score_rows(model, tokenizer, rows, batch_size: int, max_length: int, device, add_bos="auto",
               progress: bool = True, fmt: str = "mc") -> np.ndarray:
    """[len(rows), 5] float64 log-likelihoods of the five targets (lm-eval's per-choice loglik); `batch_size`
    packed questions per forward."""
    questions = packed_questions(tokenizer, rows, max_length, add_bos, fmt)
    questions.sort(key=lambda q: -len(q.row["input_ids"]))  # similar lengths share a batch
    logliks = np.zeros((len(rows), 5), dtype=np.float64)
    bar = progress_bar(total=len(questions), desc="eval", unit="question", disable=not progress)
    for s in range(0, len(questions), batch_size):
        batch = questions[s: s + batch_size]
        for q, per_choice in zip(batch, choice_logprobs(model, batch, pad_token_id(tokenizer), device)):
            for j, lp in zip(q.choices, per_choice):
                logliks[q.example, j] = float(lp.double().sum())
        bar.update(len(batch))
    bar.close()
    return logliks


def confidence_bins(conf: np.ndarray) -> np.ndarray:
    """Bin index of each confidence in ECE_BINS equal-width (lo, hi] bins over [0, 1]."""
    return np.clip(np.ceil(conf * ECE_BINS).astype(int) - 1, 0, ECE_BINS - 1)


def choice_lengths(tokenizer, rows, fmt: str, add_bos="auto") -> dict[str, np.ndarray]:
    """[len(rows), 5] each: the continuation's token count (as `build_requests` scores it) and character
    count (`data.continuation_strings`): what acc_per_token and acc_per_char divide by."""
    tokens, chars = [], []
    for row, (_, conts) in zip(rows, encode_rows(tokenizer, rows, fmt, add_bos)):
        tokens.append([len(c) for c in conts])
        chars.append([len(c) for c in continuation_strings(*prompt_and_targets(row, fmt))])
    return {"tokens": np.array(tokens, dtype=np.int64).reshape(-1, 5),
            "chars": np.array(chars, dtype=np.int64).reshape(-1, 5)}


def normalised_scores(logliks: np.ndarray, lengths: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per accuracy of ACCURACIES, the [questions, 5] scores it ranks the choices by."""
    return {name: logliks if by is None else logliks / lengths[by] for name, (by, _) in ACCURACIES.items()}


def metrics_from_logliks(logliks: np.ndarray, gold: np.ndarray) -> tuple[dict, np.ndarray]:
    """acc (argmax), and NLL / Brier / ECE / entropy of the softmax over the five choices, of per-choice
    scores: log-likelihoods, or a normalisation of them (`normalised_scores`)."""
    z = logliks - logliks.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    entropy = float(-(probs * np.log(np.clip(probs, 1e-300, None))).sum(axis=1).mean()) if len(probs) else None
    has = gold >= 0
    out = {"n": int(len(gold)), "n_with_answer": int(has.sum()), "entropy": entropy,
           "acc": None, "nll": None, "brier": None, "ece": None}
    if has.any():
        p, g = probs[has], gold[has]
        pred = logliks[has].argmax(axis=1)
        correct = (pred == g).astype(np.float64)
        onehot = np.eye(5)[g]
        conf = p.max(axis=1)
        bins = confidence_bins(conf)
        ece = sum(abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).mean()
                  for b in range(ECE_BINS) if (bins == b).any())
        out.update(acc=float(correct.mean()), nll=float(-np.log(p[np.arange(len(g)), g]).mean()),
                   brier=float(((p - onehot) ** 2).sum(axis=1).mean()), ece=float(ece))
    return out, probs


def evaluate(model, tokenizer, dataset, batch_size: int, max_length: int, device, add_bos="auto",
             progress: bool = True, fmt: str = "mc"):
    """Score `dataset` (sharded over ranks if distributed); returns (metrics, per-example rows) on every rank."""
    mine = runtime.my_share(len(dataset))
    rows = [dataset[i] for i in mine]
    is_main = not runtime.initialized() or runtime.get().is_main
    ll = score_rows(model, tokenizer, rows, batch_size, max_length, device, add_bos, progress and is_main, fmt)
    parts = runtime.gather_object((mine, ll))
    logliks = np.zeros((len(dataset), 5))
    for idx, part in parts:
        logliks[idx] = part
    return results_from_logliks(dataset, logliks, choice_lengths(tokenizer, dataset, fmt, add_bos), HEADLINE[fmt])


def results_from_logliks(dataset, logliks: np.ndarray, lengths: dict[str, np.ndarray],
                         headline: str) -> tuple[dict, list[dict]]:
    """(metrics, examples.jsonl rows) from the [questions, 5] log-likelihoods: one path for every backend.

    metrics: every accuracy of ACCURACIES, `headline` naming the one judged by, and NLL / Brier / ECE /
    entropy of the headline's choice distribution. An example: its raw logliks and the lengths (so any
    accuracy can be recomputed), and the headline's probs and pred (what paired statistics read)."""
    gold = np.array(dataset["answer"], dtype=np.int64)
    scores = normalised_scores(logliks, lengths)
    metrics, probs = metrics_from_logliks(scores[headline], gold)
    has = gold >= 0
    metrics.update({name: float((s[has].argmax(axis=1) == gold[has]).mean()) if has.any() else None
                    for name, s in scores.items()})
    metrics["headline"] = headline
    pred = scores[headline].argmax(axis=1)
    per_example = [
        {"id": dataset[i]["id"], "logliks": logliks[i].tolist(), "n_tokens": lengths["tokens"][i].tolist(),
         "n_chars": lengths["chars"][i].tolist(), "probs": probs[i].tolist(), "pred": LABELS[int(pred[i])],
         "gold": LABELS[gold[i]] if gold[i] >= 0 else None}
        for i in range(len(dataset))
    ]
    return metrics, per_example


def write_eval(out_dir: str | Path, metrics: dict, per_example: list[dict], meta: dict) -> Path:
    out_dir = Path(out_dir)
    atomic_write_jsonl(out_dir / "examples.jsonl", per_example)
    atomic_write_json(out_dir / "eval.json", {"metrics": metrics, "prompt_version": PROMPT_VERSION, **meta})
    return out_dir / "eval.json"


def eval_split(cfg):
    """The questions `distill-dist eval` scores: `eval.split`, its first `eval.limit`."""
    ds = load_split(cfg.data, cfg.eval.split)
    return ds.select(range(min(cfg.eval.limit, len(ds)))) if cfg.eval.limit else ds


def evaluate_checkpoint(cfg, model_path: str, out_dir: str | Path, device, progress: bool = True) -> tuple[dict, dict]:
    """Score a checkpoint on `cfg.eval.split` (questions shared across ranks); rank 0 writes eval.json and
    examples.jsonl. Used by `distill-dist eval` and by the recipe on its exported student."""
    from .models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(cfg.model.tokenizer or model_path)
    ds = eval_split(cfg)
    model = load_causal_lm(model_path, cfg.model.dtype, device)
    t0 = time.time()
    metrics, per_example = evaluate(model, tok, ds, cfg.eval.batch_size, cfg.data.max_length, device,
                                    cfg.data.add_bos, progress, cfg.data.format)
    local = Path(model_path).is_dir()
    plan = Path(model_path) / "pruning_plan.json"
    meta = {
        "split": cfg.eval.split,
        "data": {"source": cfg.data.source, "path": cfg.data.path, "format": cfg.data.format},
        "model": {
            "path": str(model_path),
            "fingerprint": checkpoint_fingerprint(model_path) if local else None,
            "params": sum(p.numel() for p in model.parameters()),
            "bytes_on_disk": dir_bytes(model_path) if local else None,
            "intermediate_size": model.config.intermediate_size,
            "pruning_plan_sha256": json.loads(plan.read_text()).get("plan_sha256") if plan.is_file() else None,
        },
        "world_size": runtime.get().world_size if runtime.initialized() else 1,
        "device": str(device),
        "wall_s": time.time() - t0,
    }
    if not runtime.initialized() or runtime.get().is_main:
        write_eval(out_dir, metrics, per_example, meta)
    return metrics, meta


def evaluate_gguf(cfg, gguf_path: str, out_dir: str | Path) -> tuple[dict, dict]:
    """Score a GGUF file from `distill-dist export` inside llama.cpp on exactly the requests `evaluate` scores
    (our token ids), and write the same eval.json / examples.jsonl, plus the edge measurements.

    The scoring runs in its own process (`python -m distill_dist.llamacpp`) that holds only the runtime and the
    model, so its peak RSS is the device's figure. The tokenizer is the exported checkpoint's (from the
    manifest) unless `model.tokenizer` names one."""
    from .errors import ConfigError
    from .export import read_manifest
    from .llamacpp import PP_TOKENS, TG_TOKENS, run_isolated
    from .models import load_tokenizer

    path = Path(gguf_path)
    manifest, rec = read_manifest(path)
    tok_spec = cfg.model.tokenizer or manifest["source"]["tokenizer"]
    if not tok_spec:
        raise ConfigError(f"config field 'model.tokenizer' is required: {manifest['source']['path']} had no tokenizer")
    tok = load_tokenizer(tok_spec)
    ds = eval_split(cfg)
    reqs = build_requests(tok, list(ds), cfg.data.max_length, cfg.data.add_bos, cfg.data.format)
    longest = max([len(r.input_ids) for r in reqs] + [PP_TOKENS + TG_TOKENS + 1])
    job = {"model": str(path), "n_ctx": -(-longest // 64) * 64, "f32_kv": rec["type"] == "f32",
           "threads": list(cfg.eval.threads),
           "requests": [{"ids": r.input_ids, "positions": r.positions,
                         "targets": [r.targets] if r.choice is None else [[t] for t in r.targets]} for r in reqs]}
    t0 = time.time()
    result = run_isolated(job)
    logliks = np.zeros((len(ds), 5))
    for r, sc in zip(reqs, result["scores"]):
        fill_logliks(logliks, r, np.array(sc, dtype=np.float64).ravel())
    metrics, per_example = results_from_logliks(ds, logliks, choice_lengths(tok, ds, cfg.data.format, cfg.data.add_bos),
                                                HEADLINE[cfg.data.format])
    src = manifest["source"]
    meta = {
        "split": cfg.eval.split,
        "data": {"source": cfg.data.source, "path": cfg.data.path, "format": cfg.data.format},
        "backend": "llamacpp",
        "model": {"path": str(path), "gguf_type": rec["type"], "sha256": rec["sha256"], "params": rec.get("params"),
                  "bytes_on_disk": rec["bytes"], "fingerprint": src["fingerprint"], "source": src,
                  "intermediate_size": src["intermediate_size"], "pruning_plan_sha256": src["pruning_plan_sha256"],
                  "fallback_tensors": len(rec["fallback_tensors"])},
        "edge": {"file_bytes": rec["bytes"], **result["edge"]},
        "world_size": 1,
        "device": "cpu (llama.cpp)",
        "wall_s": time.time() - t0,
    }
    write_eval(out_dir, metrics, per_example, meta)
    return metrics, meta
