"""Parity with lm-evaluation-harness's `commonsense_qa` task, for a byte-level BPE and a sentencepiece tokenizer.

The reference below is written from lm-eval 0.4.x (HFLM, causal backend, read at v0.4.12), not from
our code: the prompt is the task's `doc_to_text` applied to the raw jsonl, the continuations are
`target_delimiter` " " + `doc_to_choice` A-E, and a request is tokenised as
  - `_encode_pair`: trailing whitespace of the context moves to the continuation; the context ids are
    tok(context) and the continuation ids are tok(context + continuation) minus the first len(context ids);
  - `tok_encode`: `tokenizer.encode(s)` with the tokenizer's default special tokens when
    `add_bos_token` is None (the default since 0.4.9.2), else `add_special_tokens=add_bos_token`, with
    the tokenizer loaded with `add_bos_token=<value>`;
  - `_loglikelihood_tokens`: the model reads (ctx + cont)[-(max_length + 1):][:-1] and the
    continuation's log-probs are the last len(cont) rows; acc = argmax of the five sums.
The reference runs unbatched; ours batched, as `distill-dist eval` does.

Questions: every 4th of the 1221 dev questions (306; the whole file costs minutes on a busy 2-core
machine); DISTILL_DIST_PARITY_FULL=1 checks all 1221.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import make_tiny_model, shared_path
from distill_dist.config import DataConfig
from distill_dist.data import build_train_examples, encode_choices, load_split
from distill_dist.evaluate import metrics_from_logliks, score_rows
from distill_dist.models import load_tokenizer

TOL = 1e-5
STRIDE = 1 if os.environ.get("DISTILL_DIST_PARITY_FULL") == "1" else 4
LMEVAL_LABELS = ["A", "B", "C", "D", "E"]  # doc_to_choice


def lmeval_doc_to_text(doc: dict) -> str:
    """default.yaml's jinja template, applied to an official-jsonl row."""
    q = doc["question"]
    text = {c["label"]: c["text"] for c in q["choices"]}
    return (f"Question: {q['stem'].strip()}\nA. {text['A']}\nB. {text['B']}\nC. {text['C']}\n"
            f"D. {text['D']}\nE. {text['E']}\nAnswer:")


def lmeval_tokenizer(path, add_bos_token):
    kwargs = {} if add_bos_token is None else {"add_bos_token": add_bos_token}
    return AutoTokenizer.from_pretrained(str(path), **kwargs)


def lmeval_encode_pair(tok, context: str, continuation: str, add_bos_token) -> tuple[list[int], list[int]]:
    kwargs = {} if add_bos_token is None else {"add_special_tokens": add_bos_token}
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation, **kwargs)
    ctx = tok.encode(context, **kwargs)
    return ctx, whole[len(ctx):]


@torch.no_grad()
def lmeval_logliks(model64, tok, docs: list[dict], max_length: int, add_bos_token) -> np.ndarray:
    out = np.zeros((len(docs), 5))
    for i, doc in enumerate(docs):
        forwards: dict[tuple, torch.Tensor] = {}  # lm-eval too runs one forward for equal inputs
        for j, label in enumerate(LMEVAL_LABELS):
            ctx, cont = lmeval_encode_pair(tok, lmeval_doc_to_text(doc), " " + label, add_bos_token)
            assert ctx and cont
            inp = tuple((ctx + cont)[-(max_length + 1):][:-1])
            key = (inp, len(cont))
            if key not in forwards:
                hidden = model64.model(input_ids=torch.tensor([inp])).last_hidden_state[0]
                forwards[key] = torch.log_softmax(model64.lm_head(hidden[len(inp) - len(cont):]), dim=-1)
            out[i, j] = sum(forwards[key][t, c].item() for t, c in enumerate(cont))
    return out


@pytest.fixture(scope="module")
def raw_dev(csqa_dir) -> list[dict]:
    return [json.loads(line) for line in (csqa_dir / "dev_rand_split.jsonl").read_text().splitlines() if line]


@pytest.fixture(scope="module")
def dev(csqa_dir):
    return load_split(DataConfig(path=str(csqa_dir)), "validation")


@pytest.fixture(scope="module")
def olmo2_dir(tmp_path_factory, olmo2_tokenizer_file):
    """The real OLMo2 tokenizer as a Hugging Face dir (its post-trained configs: GPT2Tokenizer, BOS = EOS)
    with a tiny random OLMo2 on it."""
    ref = shared_path("tokenizers", "olmo2", "reference_OLMo-2-1124-13B-Instruct")
    out = tmp_path_factory.mktemp("olmo2_hf")
    shutil.copy(olmo2_tokenizer_file, out / "tokenizer.json")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ref / name, out / name)
    make_tiny_model(load_tokenizer(str(out)), hidden=32, inter=64, heads=2, seed=2).save_pretrained(out)
    return out


def _check_parity(model_dir, raw_dev, dev, max_length: int, add_bos, n: int | None = None, stride: int = 1):
    """Ours (batched, float32 log-softmax) vs the reference (unbatched, float64): per-choice logliks and acc.

    Both run the same float64 weights, so the check is on the requests, not on float32 rounding of the
    forward (that is test_evaluate's; float32 weights leave |d| <= 1e-5 here too, but with no margin)."""
    idx = list(range(0, len(raw_dev) if n is None else n, stride))
    docs, rows = [raw_dev[i] for i in idx], dev.select(idx)
    assert [d["id"] for d in docs] == rows["id"]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float64).eval()
    lmeval_bos = None if add_bos == "auto" else add_bos
    ref = lmeval_logliks(model, lmeval_tokenizer(model_dir, lmeval_bos), docs, max_length, lmeval_bos)
    got = score_rows(model, load_tokenizer(str(model_dir)), rows, 32, max_length, "cpu", add_bos, progress=False)
    gold = np.array(rows["answer"])
    assert (gold == [LMEVAL_LABELS.index(d["answerKey"]) for d in docs]).all()
    delta = float(np.abs(got - ref).max())
    ours, theirs = metrics_from_logliks(got, gold)[0]["acc"], metrics_from_logliks(ref, gold)[0]["acc"]
    print(f"\n{model_dir.name} add_bos={add_bos} max_length={max_length} n={len(docs)}: "
          f"max|dloglik| {delta:.2e}, acc ours {ours:.4f} lm-eval {theirs:.4f}")
    assert delta < TOL
    assert (got.argmax(1) == ref.argmax(1)).all() and ours == theirs
    return ref


def test_parity_olmo2_dev(olmo2_dir, raw_dev, dev):
    ref = _check_parity(olmo2_dir, raw_dev, dev, 512, "auto", stride=STRIDE)
    assert len(ref) == len(range(0, 1221, STRIDE)) and np.ptp(ref, axis=1).min() > 1e-3, "choices must differ"


def test_parity_tinystories_dev(tinystories_dir, raw_dev, dev):
    ref = _check_parity(tinystories_dir, raw_dev, dev, 512, "auto", stride=STRIDE)
    assert len(ref) == len(range(0, 1221, STRIDE))


@pytest.mark.parametrize("add_bos,max_length", [(True, 512), (False, 512), ("auto", 40)])
def test_parity_explicit_bos_and_left_truncation(tinystories_dir, raw_dev, dev, add_bos, max_length):
    """data.add_bos true/false = lm-eval's add_bos_token=True/False; at 40 tokens every prompt loses its
    start (BOS included), as in lm-eval."""
    lengths = [len(encode_choices(load_tokenizer(str(tinystories_dir)), lmeval_doc_to_text(d))[0])
               for d in raw_dev[:60]]
    assert 40 < min(lengths) and max(lengths) < 512
    _check_parity(tinystories_dir, raw_dev, dev, max_length, add_bos, n=60)


def test_bos_modes_follow_the_tokenizer_config(olmo2_dir, olmo2_tokenizer, tinystories_dir):
    """auto: Llama's config adds BOS, OLMo2's does not; the bare OLMo2 tokenizer.json splits as its HF dir."""
    prompt = "Question: Where?\nA. a\nB. b\nC. c\nD. d\nE. e\nAnswer:"
    llama = load_tokenizer(str(tinystories_dir))
    assert encode_choices(llama, prompt)[0] == [llama.bos_token_id] + encode_choices(llama, prompt, add_bos=False)[0]
    assert encode_choices(llama, prompt, add_bos=True) == encode_choices(llama, prompt)
    hf = load_tokenizer(str(olmo2_dir))
    assert hf.bos_token_id == 100257
    assert encode_choices(hf, prompt) == encode_choices(hf, prompt, add_bos=False) == encode_choices(olmo2_tokenizer,
                                                                                                   prompt)
    ctx, _ = encode_choices(hf, prompt, add_bos=True)
    assert ctx == [100257] + encode_choices(hf, prompt)[0]


def test_parity_multi_token_continuations_truncated(tmp_path, raw_dev, dev):
    """A character-level tokenizer makes " A" two tokens: one request per choice, cut from the left."""
    from test_evaluate import _byte_tokenizer

    tok = _byte_tokenizer()
    make_tiny_model(tok, hidden=32, inter=64, heads=2, seed=4).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert len(lmeval_encode_pair(tok, lmeval_doc_to_text(raw_dev[0]), " A", None)[1]) == 2
    _check_parity(tmp_path, raw_dev, dev, 48, "auto", n=12)


@pytest.mark.parametrize("arm", ["ce", "kl"])
def test_training_rows_use_the_evaluated_tokens(tinystories_dir, raw_dev, dev, arm):
    """CE labels are lm-eval's continuation of the gold choice; the supervised position predicts it."""
    tok = load_tokenizer(str(tinystories_dir))
    ref_tok = lmeval_tokenizer(tinystories_dir, None)
    rows = build_train_examples(tok, dev.select(range(30)), arm, "answer", 512)
    for doc, row in zip(raw_dev[:30], rows):
        ctx, cont = lmeval_encode_pair(ref_tok, lmeval_doc_to_text(doc), " " + doc["answerKey"], None)
        assert ctx[0] == tok.bos_token_id and len(cont) == 1
        if arm == "ce":
            assert row["input_ids"] == (ctx + cont)[:-1] and row["labels"] == cont
            assert row["positions"] == list(range(len(ctx) - 1, len(ctx) - 1 + len(cont)))
        else:
            assert row["input_ids"] == ctx and row["positions"] == [len(ctx) - 1] and "labels" not in row
