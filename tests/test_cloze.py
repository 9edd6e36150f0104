"""data.format=cloze (OLMES's rank classification of CSQA): prompts, continuation tokens, the three accuracies,
evaluation end to end against a float64 reference, training rows of both arms (KL: every choice, no labels),
and the cache's refusal."""
from __future__ import annotations

import json
import math

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from distill_dist import cli
from distill_dist.cache import CacheError, TeacherCache, _existing_manifest, expected_fingerprint
from distill_dist.calibrate import read_texts
from distill_dist.config import DataConfig, load_config
from distill_dist.data import (TARGETS, build_train_examples, continuation_strings, encode_row, format_cloze_prompt,
                               format_prompt, load_full_train, load_split, prompt_and_targets)
from distill_dist.errors import ConfigError, DataError
from distill_dist.evaluate import HEADLINE, build_requests, choice_lengths, results_from_logliks

REAL_DEV_0 = ("Question: A revolving door is convenient for two direction travel, but it also serves as a security "
              "measure at a what?\nAnswer:")


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- prompts and targets

def test_cloze_prompt_and_targets_byte_exact():
    row = {"question": "Where is it?", "choices": ["a b", "c", " d", "e ", "f"]}
    assert format_cloze_prompt("Where is it?") == "Question: Where is it?\nAnswer:"
    assert prompt_and_targets(row, "cloze") == ("Question: Where is it?\nAnswer:", (" a b", " c", "  d", " e ", " f"))
    # OLMES's make_cloze_prompt takes the question as it is (lm-eval's mc prompt strips it)
    assert format_cloze_prompt("  Why? ") == "Question:   Why? \nAnswer:"
    assert prompt_and_targets(row, "mc") == (format_prompt(row["question"], row["choices"]), TARGETS)
    assert continuation_strings("Question: q\nAnswer: ", (" x", "y")) == ["  x", " y"]  # trailing space moves
    with pytest.raises(DataError, match=r"^config field 'data.format' = 'letters': expected mc or cloze$"):
        prompt_and_targets(row, "letters")


def test_bad_data_format_is_one_config_line():
    with pytest.raises(ConfigError, match=r"^config field 'data.format' = 'rc': expected mc or cloze$"):
        load_config(None, ["data.format=rc"])
    assert load_config(None, []).data.format == "mc"


@pytest.fixture(scope="module")
def real_dev(csqa_dir):
    return load_split(DataConfig(path=str(csqa_dir)), "validation")


def test_real_dev_row_hand_checked_olmo2_ids(olmo2_tokenizer, real_dev):
    """The first dev question, ids read off OLMo2's vocabulary by hand: "Ġbank" is 6201, and so on."""
    tok, row = olmo2_tokenizer, real_dev[0]
    prompt, targets = prompt_and_targets(row, "cloze")
    assert prompt == REAL_DEV_0
    assert targets == (" bank", " library", " department store", " mall", " new york")
    vocab = tok.get_vocab()
    hand = {"Question": 14924, ":": 25, "Ġwhat": 1148, "?Ċ": 5380, "Answer": 16533, "Ġbank": 6201,
            "Ġlibrary": 6875, "Ġdepartment": 9476, "Ġstore": 3637, "Ġmall": 34353, "Ġnew": 502, "Ġyork": 50672}
    assert {t: vocab[t] for t in hand} == hand
    ctx, conts = encode_row(tok, row, "cloze")
    assert ctx[:2] == [14924, 25] and ctx[-4:] == [1148, 5380, 16533, 25] and len(ctx) == 26
    assert conts == [[6201], [6875], [9476, 3637], [34353], [502, 50672]]


def test_cloze_continuations_by_the_joint_encoding_rule(olmo2_tokenizer, real_dev):
    """Context = the prompt's ids; each continuation = the joint encoding of prompt + " " + answer after them."""
    tok = olmo2_tokenizer
    multi = 0
    for r in real_dev.select(range(60)):
        prompt = f"Question: {r['question']}\nAnswer:"
        ctx, conts = encode_row(tok, r, "cloze")
        assert ctx == _ids(tok, prompt)
        for text, cont in zip(r["choices"], conts):
            joint = _ids(tok, prompt + " " + text)
            assert cont == joint[len(ctx):] and ctx + cont == joint
            multi += len(cont) > 1
    assert multi > 20, "the sample must hold multi-token answers"


# ---------------------------------------------------------------- the three accuracies

def test_three_accuracies_and_headline_distribution_by_hand():
    ds = datasets.Dataset.from_list([{"id": f"q{i}", "answer": a} for i, a in enumerate([2, 0, 2])])
    ll = np.array([[-2.0, -3.0, -4.8, -6.0, -9.0], [-1.0, -5.0, -2.0, -8.0, -7.0], [-4.0, -3.0, -6.0, -5.0, -3.5]])
    tokens = np.array([[1, 2, 3, 2, 4], [2, 1, 1, 3, 2], [2, 1, 4, 2, 1]])
    chars = np.array([[4, 6, 16, 12, 20], [10, 3, 5, 9, 8], [8, 4, 30, 10, 5]])
    # by hand: raw argmax 0, 0, 1 -> right on q1 only; per token [-2, -1.5, -1.6, -3, -2.25] -> 1,
    # [-0.5, -5, -2, -2.67, -3.5] -> 0, [-2, -3, -1.5, -2.5, -3.5] -> 2; per char below -> 2, 0, 2
    per_char = [[-0.5, -0.5, -0.3, -0.5, -0.45], [-0.1, -5 / 3, -0.4, -8 / 9, -0.875], [-0.5, -0.75, -0.2, -0.5, -0.7]]
    m, rows = results_from_logliks(ds, ll, {"tokens": tokens, "chars": chars}, HEADLINE["cloze"])
    assert (m["headline"], m["acc"], m["acc_per_token"], m["acc_per_char"]) == ("acc_per_char", 1 / 3, 2 / 3, 1.0)
    probs = []
    for scores in per_char:
        e = [math.exp(s) for s in scores]
        probs.append([x / sum(e) for x in e])
    gold = [2, 0, 2]
    assert m["nll"] == pytest.approx(sum(-math.log(p[g]) for p, g in zip(probs, gold)) / 3, rel=1e-12)
    brier = [sum((p[c] - (c == g)) ** 2 for c in range(5)) for p, g in zip(probs, gold)]
    assert m["brier"] == pytest.approx(sum(brier) / 3, rel=1e-12)
    assert m["entropy"] == pytest.approx(sum(-sum(x * math.log(x) for x in p) for p in probs) / 3, rel=1e-12)
    assert [r["pred"] for r in rows] == ["C", "A", "C"] and [r["gold"] for r in rows] == ["C", "A", "C"]
    assert np.allclose([r["probs"] for r in rows], probs, rtol=1e-12)
    assert [r["logliks"] for r in rows] == ll.tolist() and [r["n_chars"] for r in rows] == chars.tolist()
    mc, mc_rows = results_from_logliks(ds, ll, {"tokens": tokens, "chars": chars}, HEADLINE["mc"])
    assert (mc["headline"], mc["acc"]) == ("acc", 1 / 3) and [r["pred"] for r in mc_rows] == ["A", "A", "B"]


# ---------------------------------------------------------------- evaluation end to end (torch)

@torch.no_grad()
def _reference(model64, tok, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per choice, unpadded, float64: sum of log p(continuation token), the token and character counts."""
    ll, n_tok, n_chr = (np.zeros((len(rows), 5)) for _ in range(3))
    for i, r in enumerate(rows):
        prompt = "Question: " + r["question"] + "\nAnswer:"
        ctx = _ids(tok, prompt)
        for c, text in enumerate(r["choices"]):
            cont = _ids(tok, prompt + " " + text)[len(ctx):]
            hidden = model64.model(input_ids=torch.tensor([ctx + cont])).last_hidden_state[0]
            logp = torch.log_softmax(model64.lm_head(hidden[len(ctx) - 1: len(ctx) - 1 + len(cont)]), dim=-1)
            ll[i, c] = sum(logp[t, x].item() for t, x in enumerate(cont))
            n_tok[i, c], n_chr[i, c] = len(cont), len(" " + text)
    return ll, n_tok, n_chr


def test_cli_eval_cloze_matches_float64_reference(tiny_olmo2_dir, tiny_tokenizer, synthetic_data_dir, tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["eval", f"model.path={tiny_olmo2_dir}", f"data.path={synthetic_data_dir}", "data.format=cloze",
                     "eval.limit=12", "eval.batch_size=8", "eval.device=cpu", f"eval.output_dir={out}",
                     f"output_dir={tmp_path}"]) == 0
    res = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    dev = load_split(DataConfig(path=str(synthetic_data_dir)), "validation").select(range(12))
    model64 = AutoModelForCausalLM.from_pretrained(str(tiny_olmo2_dir)).double().eval()
    ll, n_tok, n_chr = _reference(model64, tiny_tokenizer, dev)
    assert n_tok.max() > 1, "some answers must span several tokens"
    got = np.array([r["logliks"] for r in rows])
    assert np.abs(got - ll).max() < 1e-4
    assert [r["n_tokens"] for r in rows] == n_tok.tolist() and [r["n_chars"] for r in rows] == n_chr.tolist()
    gold = np.array(dev["answer"])
    scores = {"acc": ll, "acc_per_token": ll / n_tok, "acc_per_char": ll / n_chr}
    for name, s in scores.items():
        top2 = np.sort(s, axis=1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > 2e-4, f"{name}: a near tie could flip the argmax"
        assert res["metrics"][name] == float((s.argmax(1) == gold).mean()), name
    z = np.exp(scores["acc_per_char"] - scores["acc_per_char"].max(1, keepdims=True))
    probs = z / z.sum(1, keepdims=True)
    assert res["metrics"]["headline"] == "acc_per_char" and res["data"]["format"] == "cloze"
    assert res["metrics"]["nll"] == pytest.approx(-np.log(probs[np.arange(len(gold)), gold]).mean(), abs=1e-4)
    assert np.abs(np.array([r["probs"] for r in rows]) - probs).max() < 1e-4
    assert [r["pred"] for r in rows] == ["ABCDE"[k] for k in scores["acc_per_char"].argmax(1)]


def test_cloze_requests_score_each_answer_text(tiny_tokenizer, synthetic_data_dir):
    """One sequence per choice (context + continuation minus its last id), scored at the continuation, unless all
    five answers are one token; the llama.cpp backend receives the same requests. choice_lengths counts what
    they score."""
    rows = list(load_split(DataConfig(path=str(synthetic_data_dir)), "validation").select(range(8)))
    reqs = build_requests(tiny_tokenizer, rows, 512, fmt="cloze")
    lengths = choice_lengths(tiny_tokenizer, rows, "cloze")
    conts = {}
    for i, row in enumerate(rows):
        prompt = "Question: " + row["question"] + "\nAnswer:"
        ctx = _ids(tiny_tokenizer, prompt)
        conts[i] = (ctx, [_ids(tiny_tokenizer, prompt + " " + text)[len(ctx):] for text in row["choices"]])
        assert lengths["tokens"][i].tolist() == [len(c) for c in conts[i][1]]
        assert lengths["chars"][i].tolist() == [len(text) + 1 for text in row["choices"]]
    shared = {i for i, (_, cs) in conts.items() if all(len(c) == 1 for c in cs)}
    assert 0 < len(shared) < len(rows), "the sample must hold both kinds of question"
    assert len(reqs) == len(shared) + 5 * (len(rows) - len(shared))
    for r in reqs:
        ctx, cs = conts[r.example]
        if r.choice is None:  # five one-token answers: one sequence, all five read at its last position
            assert r.example in shared and r.input_ids == ctx and r.positions == [len(ctx) - 1]
            assert r.targets == [c[0] for c in cs]
            continue
        cont = cs[r.choice]
        assert r.input_ids == (ctx + cont)[:-1] and r.targets == cont
        assert r.positions == list(range(len(ctx) - 1, len(ctx) - 1 + len(cont)))


# ---------------------------------------------------------------- training rows

def test_cloze_training_rows_ce_gold_kl_every_choice(tiny_tokenizer, synthetic_data_dir):
    """CE: prompt + gold answer, labelled at the answer's positions. KL: the prompt and all five answers packed,
    supervised exactly at the positions that predict a choice token (answer) or everywhere (all)."""
    tok = tiny_tokenizer
    train = load_split(DataConfig(path=str(synthetic_data_dir)), "train").select(range(20))
    for positions in ("answer", "all"):
        ce = build_train_examples(tok, train, "ce", positions, 512, fmt="cloze")
        kl = build_train_examples(tok, train, "kl", positions, 512, fmt="cloze")
        for r, c, k in zip(train, ce, kl):
            prompt = "Question: " + r["question"] + "\nAnswer:"
            ctx = _ids(tok, prompt)
            conts = [_ids(tok, prompt + " " + text)[len(ctx):] for text in r["choices"]]
            gold = conts[r["answer"]]
            assert c["input_ids"] == (ctx + gold)[:-1] and "blocks" not in c
            want = (list(range(len(ctx) + len(gold) - 1)) if positions == "all"
                    else list(range(len(ctx) - 1, len(ctx) - 1 + len(gold))))
            assert c["positions"] == want and c["labels"] == [(ctx + gold)[p + 1] for p in want]

            assert "labels" not in k and k["id"] == c["id"]
            assert k["input_ids"] == ctx + [t for cont in conts for t in cont[:-1]]
            assert k["blocks"] == [len(cont) - 1 for cont in conts]
            predicting = {len(ctx) - 1}  # each choice's tokens, read along its own block
            start = len(ctx)
            for cont in conts:
                predicting |= set(range(start, start + len(cont) - 1))
                start += len(cont) - 1
            assert k["positions"] == (list(range(len(k["input_ids"]))) if positions == "all" else sorted(predicting))
    assert any(sum(k["blocks"]) > 0 for k in kl), "some answers must span several tokens"
    # left truncation keeps the whole answer supervised; the packed prompt is cut for the longest choice
    short = build_train_examples(tok, train, "ce", "answer", 12, fmt="cloze")
    full = build_train_examples(tok, train, "ce", "answer", 512, fmt="cloze")
    assert all(len(s["input_ids"]) <= 12 and s["labels"] == f["labels"] for s, f in zip(short, full))
    for k, f in zip(build_train_examples(tok, train, "kl", "answer", 12, fmt="cloze"), kl):
        prompt = len(k["input_ids"]) - sum(k["blocks"])
        assert prompt + max(k["blocks"]) <= 12 and k["blocks"] == f["blocks"]
        assert k["input_ids"][prompt:] == f["input_ids"][len(f["input_ids"]) - sum(f["blocks"]):]
    # mc is as before: the KL arm reads the prompt only, at its last position
    mc = build_train_examples(tok, train, "kl", "answer", 512)
    assert [r["input_ids"] for r in mc] == [_ids(tok, format_prompt(r["question"], r["choices"])) for r in train]
    assert all(r["positions"] == [len(r["input_ids"]) - 1] and "labels" not in r and "blocks" not in r for r in mc)


@pytest.mark.parametrize("fmt", ["mc", "cloze"])
def test_unlabelled_split_builds_kl_rows_and_refuses_ce(tiny_tokenizer, synthetic_data_dir, fmt):
    test = load_split(DataConfig(path=str(synthetic_data_dir)), "test")
    assert set(test["answer"]) == {-1}
    kl = build_train_examples(tiny_tokenizer, test, "kl", "answer", 512, fmt=fmt)
    assert [r["id"] for r in kl] == test["id"] and all(r["positions"] for r in kl)
    with pytest.raises(DataError, match=rf"^training row {test['id'][0]} has no answer: the CE arm trains on the "
                                        r"gold answer, it needs a labelled split$"):
        build_train_examples(tiny_tokenizer, test, "ce", "answer", 512, fmt=fmt)


def test_calibration_texts_follow_data_format(synthetic_data_dir):
    cfg = load_config(None, [f"data.path={synthetic_data_dir}", "data.format=cloze", "prune.calibration=train",
                             "prune.calibration_samples=7"])
    texts, kind = read_texts(cfg)
    assert kind == "train" and texts == [f"Question: {r['question']}\nAnswer:"
                                         for r in load_full_train(cfg.data).select(range(7))]


# ---------------------------------------------------------------- the teacher cache

def test_cache_of_another_format_is_refused(tiny_tokenizer, synthetic_data_dir, tmp_path):
    cfgs = {f: load_config(None, [f"data.path={synthetic_data_dir}", f"data.format={f}"]) for f in ("mc", "cloze")}
    full = load_full_train(cfgs["mc"].data)
    fps = {f: expected_fingerprint(c, "t" * 64, tiny_tokenizer, full) for f, c in cfgs.items()}
    rows = {"mc": "None", "cloze": "prompt \\+ every choice, packed"}
    for built, run in (("mc", "cloze"), ("cloze", "mc")):
        cache = TeacherCache(tmp_path, {"fingerprint": fps[built]}, [])
        with pytest.raises(CacheError, match=rf"^teacher cache {tmp_path} does not match this run: data\.format: "
                                             rf"cache {built} vs run {run}, kl_rows: cache {rows[built]} vs run "
                                             rf"{rows[run]}$"):
            cache.check(fps[run], [], [])
    before = {k: v for k, v in fps["cloze"].items() if k != "kl_rows"}  # a cloze cache of gold-answer rows
    with pytest.raises(CacheError, match=r"does not match this run: kl_rows: cache None vs run prompt \+ every "
                                         r"choice, packed$"):
        TeacherCache(tmp_path, {"fingerprint": before}, []).check(fps["cloze"], [], [])
    cache_dir = tmp_path / "cache"  # cache-teacher into a directory holding the other format's cache
    cache_dir.mkdir()
    (cache_dir / "manifest.json").write_text(json.dumps({"fingerprint": fps["mc"], "fingerprint_sha256": "x"}))
    with pytest.raises(CacheError, match=r"another fingerprint \(data\.format: cache mc vs run cloze, kl_rows: "):
        _existing_manifest(cache_dir, fps["cloze"], "y")
