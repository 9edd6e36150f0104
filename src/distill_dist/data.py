"""CommonsenseQA: read any of its published forms, normalise to one schema, format prompts.

Normalised row: {id: str, question: str, choices: [5 str], answer: int (0-4, or -1 when the split
has no answers)}. Every source goes through the same row check, so a bad row is reported with its
file and line (or dataset row) and never silently dropped.

A question is put to the model in one of two formats (`data.format`, `prompt_and_targets`), in evaluation
and in training alike:
- mc: lm-eval-harness's `commonsense_qa` task (the choices A-E in the prompt, the five letters scored);
- cloze: OLMES's rank-classification ("RC") formulation of CSQA (Gu et al. 2024, "OLMES: A Standard for
  Language Model Evaluations", arXiv 2406.08446; its prompt `make_cloze_prompt` in allenai/OLMo-Eval
  olmo_eval/tasks/olmes_v0_1): "Question: <question>\nAnswer:" and the five answer texts, each after a
  space, scored as continuations. Zero-shot here (OLMES prepends 5 curated examples).
Either way the tokens are lm-eval's context/continuation split for any tokenizer (`encode_choices`).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import datasets
import torch

from .config import DATA_FORMATS, DataConfig
from .errors import DataError
from .packing import block_attention, pack_choices

LABELS = ("A", "B", "C", "D", "E")
# lm-eval-harness `commonsense_qa`: target_delimiter " " + doc_to_choice ['A'..'E'].
TARGETS = tuple(" " + label for label in LABELS)
# Bump when format_prompt or the tokenisation of requests changes: caches and run metadata record it.
# v2: lm-eval's joint-encoding continuation split and BOS rule (encode_choices).
PROMPT_VERSION = "lm-eval-csqa-v2"
# What the KL arm's rows hold in data.format=cloze (`build_train_examples`); a teacher cache records it.
KL_CLOZE_ROWS = "prompt + every choice, packed"

OFFICIAL_FILES = {
    "train": "train_rand_split.jsonl",
    "validation": "dev_rand_split.jsonl",
    "test": "test_rand_split_no_answers.jsonl",
}
FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "question": datasets.Value("string"),
        "choices": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("int32"),
    }
)


def format_prompt(question: str, choices: list[str]) -> str:
    """Byte-for-byte the lm-eval-harness `commonsense_qa` doc_to_text."""
    lines = [f"Question: {question.strip()}"]
    lines += [f"{label}. {text}" for label, text in zip(LABELS, choices)]
    return "\n".join(lines) + "\nAnswer:"


def format_cloze_prompt(question: str) -> str:
    """Byte-for-byte OLMES's `make_cloze_prompt` (the question as it is, unstripped, as there)."""
    return f"Question: {question}\nAnswer:"


def prompt_and_targets(row: dict, fmt: str) -> tuple[str, tuple[str, ...]]:
    """One question in `data.format` fmt: (prompt, the five target strings in choice order).
    mc: the letters " A".." E"; cloze: " " + each answer text (OLMES's and lm-eval's target delimiter)."""
    if fmt == "mc":
        return format_prompt(row["question"], row["choices"]), TARGETS
    if fmt == "cloze":
        return format_cloze_prompt(row["question"]), tuple(" " + text for text in row["choices"])
    raise DataError(f"config field 'data.format' = {fmt!r}: expected {' or '.join(DATA_FORMATS)}")


def _normalise(row: Any, where: str) -> dict:
    """Accept the official jsonl schema or the tau/commonsense_qa schema; return the normalised row."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "id" not in row:
        raise DataError(f"{where}: missing field 'id'")
    q = row.get("question")
    if isinstance(q, dict):  # official: question.stem + question.choices[{label,text}]
        stem = q.get("stem")
        raw_choices = q.get("choices")
        if stem is None:
            raise DataError(f"{where}: missing field 'question.stem'")
        if not isinstance(raw_choices, list):
            raise DataError(f"{where}: missing field 'question.choices' (a list of {{label, text}})")
        try:
            labels = [c["label"] for c in raw_choices]
            texts = [c["text"] for c in raw_choices]
        except (KeyError, TypeError):
            raise DataError(f"{where}: every entry of 'question.choices' needs 'label' and 'text'") from None
    elif isinstance(q, str):  # tau/commonsense_qa: question + choices{label: [...], text: [...]}
        stem = q
        ch = row.get("choices")
        if not isinstance(ch, dict) or "label" not in ch or "text" not in ch:
            raise DataError(f"{where}: missing field 'choices' ({{label: [...], text: [...]}})")
        labels, texts = list(ch["label"]), list(ch["text"])
    else:
        raise DataError(f"{where}: missing field 'question' (an object with 'stem' or a string)")
    if len(texts) != 5 or len(labels) != 5:
        raise DataError(f"{where}: expected 5 choices, found {len(texts)}")
    if tuple(labels) != LABELS:
        raise DataError(f"{where}: choice labels must be A-E in order, found {labels}")
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}: choice texts must be strings")
    key = row.get("answerKey")
    if key is None or key == "":
        answer = -1
    elif isinstance(key, str) and key.strip() in LABELS:
        answer = LABELS.index(key.strip())
    else:
        raise DataError(f"{where}: answerKey {key!r} is not one of the choice labels {list(LABELS)}")
    return {"id": str(row["id"]), "question": stem, "choices": texts, "answer": answer}


def read_jsonl(path: str | Path) -> datasets.Dataset:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            rows.append(_normalise(obj, where))
    if not rows:
        raise DataError(f"{path}: empty (no questions); expected one CommonsenseQA question per line")
    return datasets.Dataset.from_list(rows, features=FEATURES)


def _from_hf(ds: datasets.Dataset, origin: str) -> datasets.Dataset:
    rows = [_normalise(dict(r), f"{origin} row {i}") for i, r in enumerate(ds)]
    if not rows:
        raise DataError(f"{origin}: empty (no questions); expected CommonsenseQA rows")
    return datasets.Dataset.from_list(rows, features=FEATURES)


def load_split(cfg: DataConfig, split: str) -> datasets.Dataset:
    """One normalised split; `train` is subsampled to cfg.train_examples with cfg.seed."""
    if split == "holdout" or (split == "train" and cfg.holdout):
        return _split_holdout(cfg, split)
    if split not in OFFICIAL_FILES:
        raise DataError(f"unknown split '{split}'; expected one of {list(OFFICIAL_FILES)} or holdout")
    if cfg.source == "jsonl":
        root = Path(cfg.path)
        if not root.is_dir():
            raise DataError(f"config field 'data.path': no such directory '{cfg.path}'")
        ds = read_jsonl(root / OFFICIAL_FILES[split])
    elif cfg.source == "disk":
        try:
            saved = datasets.load_from_disk(cfg.path)
        except FileNotFoundError:
            raise DataError(f"config field 'data.path': no saved dataset at '{cfg.path}'") from None
        if isinstance(saved, datasets.DatasetDict):
            if split not in saved:
                raise DataError(f"saved dataset '{cfg.path}' has no split '{split}' (has {list(saved)})")
            saved = saved[split]
        ds = _from_hf(saved, f"{cfg.path} [{split}]")
    else:  # hub
        try:
            ds = _from_hf(datasets.load_dataset(cfg.path, split=split), f"{cfg.path} [{split}]")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot load hub dataset '{cfg.path}' split '{split}': {str(e).splitlines()[0]}") from None
    if split == "train" and cfg.train_examples is not None:
        ds = subsample(ds, cfg.train_examples, cfg.seed)
    return ds


def _split_holdout(cfg: DataConfig, split: str) -> datasets.Dataset:
    """`train` without its last data.holdout rows, or (`holdout`) those rows: a slice of labelled questions that
    training never reads, for choosing a schedule without looking at validation."""
    if cfg.holdout <= 0:
        raise DataError("eval.split=holdout needs config field 'data.holdout' > 0 (the train rows held out)")
    full = load_full_train(cfg)
    if cfg.holdout >= len(full):
        raise DataError(f"config field 'data.holdout' = {cfg.holdout}: the train split has only {len(full)} rows")
    cut = len(full) - cfg.holdout
    if split == "holdout":
        return full.select(range(cut, len(full)))
    kept = full.select(range(cut))
    return kept if cfg.train_examples is None else subsample(kept, cfg.train_examples, cfg.seed)


def load_full_train(cfg: DataConfig) -> datasets.Dataset:
    """The whole train split, whatever data.train_examples says: what a teacher cache covers (its shards and
    fingerprint), so that runs on different subsamples share one cache, and what a plan measures."""
    return load_split(replace(cfg, train_examples=None, holdout=0), "train")


def subsample(ds: datasets.Dataset, n: int, seed: int) -> datasets.Dataset:
    """The same (n, seed) always picks the same rows, and a smaller n is a prefix of a larger one."""
    if n > len(ds):
        raise DataError(f"config field 'data.train_examples' = {n}: the split has only {len(ds)} rows")
    return ds.shuffle(seed=seed).select(range(n)).flatten_indices()


ADD_BOS_MODES = ("auto", True, False)


def lmeval_encoder(tokenizer, add_bos="auto") -> Callable[[list[str]], list[list[int]]]:
    """strings -> their ids, each as lm-eval's HF model (`HFLM.tok_encode`) encodes a request string.

    One call for many strings: a fast tokenizer encodes the batch in Rust at once, with the same ids as
    one call per string (no padding, no truncation), and 50k strings one by one took 5 s per training start.

    `add_bos` (config field `data.add_bos`) maps onto lm-eval's `add_bos_token` model argument:
    - "auto": the tokenizer's own special tokens (`add_special_tokens=True`), i.e. BOS exactly when the
      tokenizer's config says so (Llama/sentencepiece: yes; OLMo2/GPT-style byte-level BPE: no).
      This is lm-eval's default from 0.4.9.2 on (`add_bos_token=None`).
    - False: no special tokens; lm-eval with `add_bos_token=False`, and its default before 0.4.9.2.
    - True: the tokenizer's BOS, then the plain encoding (`add_bos_token=True`).
    (lm-eval also drops special tokens for a string that already starts with the BOS text; a CSQA
    prompt starts with "Question:", so that rule never applies here.)
    """
    if add_bos not in ADD_BOS_MODES:
        raise DataError(f"config field 'data.add_bos' = {add_bos!r}: expected auto, true or false")
    if add_bos is True and tokenizer.bos_token_id is None:
        raise DataError("config field 'data.add_bos' = true: the tokenizer has no BOS token (use auto or false)")
    prefix = [tokenizer.bos_token_id] if add_bos is True else []
    special = add_bos == "auto"

    def encode(texts: list[str]) -> list[list[int]]:
        return [prefix + ids for ids in tokenizer(list(texts), add_special_tokens=special)["input_ids"]] if texts else []

    return encode


def encode_choices(tokenizer, prompt: str, targets=TARGETS, add_bos="auto") -> tuple[list[int], list[list[int]]]:
    """lm-eval's context/continuation split (`LM._encode_pair`, causal models), for any tokenizer.

    Trailing whitespace of the prompt moves to the front of every target; then the context ids are
    the encoding of the prompt, and a target's continuation ids are the encoding of prompt+target
    with the first len(context) ids dropped. The model reads context + continuation, which is not
    always the joint encoding: with a sentencepiece ":▁" merge, "Answer: A" scores the bare "A"
    after ":". Both encodings get the special tokens `add_bos` selects (see `lmeval_encoder`).
    Returns (context ids, one continuation id list per target).
    """
    return encode_pairs(tokenizer, [(prompt, targets)], add_bos)[0]


def encode_pairs(tokenizer, pairs: list[tuple[str, tuple[str, ...]]], add_bos="auto"
                 ) -> list[tuple[list[int], list[list[int]]]]:
    """`encode_choices` of many (prompt, targets) pairs, with two batched tokenizer calls for all of them."""
    stripped = [prompt.rstrip() for prompt, _ in pairs]
    joint_texts = [s + c for s, (prompt, targets) in zip(stripped, pairs) for c in continuation_strings(prompt, targets)]
    enc = lmeval_encoder(tokenizer, add_bos)
    contexts, joints = enc(stripped), iter(enc(joint_texts))
    out = []
    for context, s, (_, targets) in zip(contexts, stripped, pairs):
        conts = [next(joints)[len(context):] for _ in targets]
        for t, cont in zip(targets, conts):
            if not cont:  # lm-eval asserts a non-empty continuation too
                raise DataError(f"target {t!r} adds no tokens after the prompt {s[-30:]!r}: nothing to score")
        out.append((context, conts))
    return out


def continuation_strings(prompt: str, targets) -> list[str]:
    """The text each continuation stands for: the prompt's trailing whitespace, then the target (lm-eval's
    split, see `encode_choices`). What per-character normalisation counts."""
    moved = prompt[len(prompt.rstrip()):]
    return [moved + t for t in targets]


def encode_row(tokenizer, row: dict, fmt: str, add_bos="auto") -> tuple[list[int], list[list[int]]]:
    """(context ids, five continuation id lists) of one question in `data.format` fmt."""
    return encode_rows(tokenizer, [row], fmt, add_bos)[0]


def encode_rows(tokenizer, rows, fmt: str, add_bos="auto") -> list[tuple[list[int], list[list[int]]]]:
    """`encode_row` of every row, batched (`encode_pairs`)."""
    return encode_pairs(tokenizer, [prompt_and_targets(r, fmt) for r in rows], add_bos)


def build_train_examples(tokenizer, ds: datasets.Dataset, arm: str, positions: str, max_length: int,
                         add_bos="auto", fmt: str = "mc") -> list[dict]:
    """Tokenised training rows: {id, input_ids, positions[, blocks][, labels]}, with evaluation's exact tokens.

    `positions` index the input tokens whose next-token distribution is supervised: "answer" = where an
    answer token is predicted, "all" = every position. Only the CE arm reads the gold answer.
    - CE (both formats): context + gold continuation minus its last id (`encode_pairs`, as evaluation), cut
      from the left to `max_length` as lm-eval cuts; labels are the continuation ids evaluation scores.
    - KL, mc: the prompt alone; the answer is one letter, predicted at the prompt's last position.
    - KL, cloze: the prompt and every choice's continuation, teacher-forced, packed in one row as
      evaluation packs them (`packing.pack_choices`: each choice a block that sees the prompt and itself);
      "answer" = every position that predicts a choice token (the prompt's last, and each block's own).
    So the KL arm's rows never read `answer`: an unlabelled split trains it, and relabelling changes nothing.
    """
    records = ds.to_list() if isinstance(ds, datasets.Dataset) else list(ds)
    if arm == "ce" and (r := next((r for r in records if r["answer"] < 0), None)):
        raise DataError(f"training row {r['id']} has no answer: the CE arm trains on the gold answer, it needs a "
                        "labelled split")
    if arm == "kl" and fmt == "cloze":
        return [_kl_cloze_row(r, ctx, conts, positions, max_length)
                for r, (ctx, conts) in zip(records, encode_rows(tokenizer, records, fmt, add_bos))]
    pairs = []  # only the continuation a row trains on: 2 strings to encode per row, not 6
    for r in records:
        prompt, targets = prompt_and_targets(r, fmt)
        pairs.append((prompt, (targets[r["answer"]],) if arm == "ce" else ()))
    rows = []
    for r, (ctx, conts) in zip(records, encode_pairs(tokenizer, pairs, add_bos)):
        if arm == "kl":  # mc: the prompt only
            ids = ctx[-max_length:]
            pos = list(range(len(ids))) if positions == "all" else [len(ids) - 1]
            rows.append({"id": r["id"], "input_ids": ids, "positions": pos})
            continue
        gold = conts[0]
        full = (ctx + gold)[-(max_length + 1):]
        ids = full[:-1]
        pos = list(range(len(ids))) if positions == "all" else list(range(len(ids) - len(gold), len(ids)))
        rows.append({"id": r["id"], "input_ids": ids, "positions": pos, "labels": [full[p + 1] for p in pos]})
    return rows


def _kl_cloze_row(record: dict, ctx: list[int], conts: list[list[int]], positions: str, max_length: int) -> dict:
    """The cloze KL arm's row: the prompt and all five continuations packed (see `build_train_examples`)."""
    packed = pack_choices(ctx, conts, max_length, f"training row {record['id']}")
    ids = packed["input_ids"]
    pos = list(range(len(ids))) if positions == "all" else packed["positions"]
    return {"id": record["id"], "input_ids": ids, "blocks": packed["blocks"], "positions": pos}


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's own, else 0 (padding is masked, so any id serves)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def collate(rows: list[dict], pad_id: int, device) -> dict:
    """Right-padded ids + mask, and (rows, cols) of every supervised position in row order; labels if any.

    The mask is [B, width] (1: a token, 0: padding), unless a row packs continuation blocks after its
    prompt (`packing.pack_choices`): then it is `packing.block_attention`'s [B, 1, width, width] mask,
    with the blocks' position ids."""
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[b, : len(r["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if any(any(r.get("blocks", ())) for r in rows):
        batch["attention_mask"], batch["position_ids"] = block_attention(rows, width)
    batch.update({
        "rows": torch.tensor([b for b, r in enumerate(rows) for _ in r["positions"]]),
        "cols": torch.tensor([p for r in rows for p in r["positions"]]),
    })
    if "labels" in rows[0]:
        batch["labels"] = torch.tensor([y for r in rows for y in r["labels"]])
    if torch.device(device).type == "cuda":  # pinned + non-blocking: the copy does not wait for the GPU's queue
        return {k: v.pin_memory().to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(device) for k, v in batch.items()}
