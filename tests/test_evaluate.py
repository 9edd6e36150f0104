"""Evaluation: metrics against a plain float64 loop, batched log-likelihoods against an unpadded float64 model."""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from distill_dist import cli
from distill_dist.config import DataConfig, load_config
from distill_dist.data import LABELS, TARGETS, format_prompt, load_split
from distill_dist.evaluate import (ECE_BINS, _Question, build_requests, choice_logprobs, evaluate, metrics_from_logliks,
                                   score_rows)
from distill_dist.fileio import dir_bytes
from distill_dist.hf_checkpoint import checkpoint_fingerprint
from distill_dist.packing import pack_choices
from distill_dist.prune import prune_checkpoint

# ---------------------------------------------------------------- metrics

def reference_metrics(ll: np.ndarray, gold: np.ndarray) -> tuple[dict, list[list[float]]]:
    """One example at a time, in plain Python floats (float64)."""
    probs = []
    for row in ll.tolist():
        m = max(row)
        e = [math.exp(x - m) for x in row]
        probs.append([x / sum(e) for x in e])
    entropy = sum(-sum(p * math.log(p) for p in ps if p > 0) for ps in probs) / len(probs)
    answered = [i for i in range(len(ll)) if gold[i] >= 0]
    correct, conf, nll, brier = {}, {}, [], []
    for i in answered:
        g = int(gold[i])
        pred = max(range(5), key=lambda c: ll[i][c])
        correct[i] = 1.0 if pred == g else 0.0
        conf[i] = max(probs[i])
        nll.append(-math.log(probs[i][g]))
        brier.append(sum((probs[i][c] - (1.0 if c == g else 0.0)) ** 2 for c in range(5)))
    ece = 0.0
    for b in range(ECE_BINS):
        lo, hi = b / ECE_BINS, (b + 1) / ECE_BINS
        members = [i for i in answered if lo < conf[i] <= hi]
        if members:
            acc_b = sum(correct[i] for i in members) / len(members)
            conf_b = sum(conf[i] for i in members) / len(members)
            ece += len(members) / len(answered) * abs(acc_b - conf_b)
    return {"n": len(ll), "n_with_answer": len(answered), "entropy": entropy,
            "acc": sum(correct.values()) / len(answered), "nll": sum(nll) / len(nll),
            "brier": sum(brier) / len(brier), "ece": ece}, probs


def test_metrics_match_per_example_reference():
    rng = np.random.default_rng(0)
    n = 400
    # per-row temperatures spread the confidences over most of the 15 bins
    ll = rng.normal(size=(n, 5)) * rng.uniform(0.05, 6.0, size=(n, 1)) - 3.0
    gold = rng.integers(0, 5, size=n)
    gold[rng.choice(n, 60, replace=False)] = -1
    # make the model right more often than chance so accuracy and calibration are not trivial
    favoured = rng.random(n) < 0.5
    ll[favoured & (gold >= 0), gold[favoured & (gold >= 0)]] += 2.0

    got, probs = metrics_from_logliks(ll, gold)
    ref, ref_probs = reference_metrics(ll, gold)
    assert got["n"] == ref["n"] == 400 and got["n_with_answer"] == ref["n_with_answer"] == 340
    for key in ("acc", "nll", "brier", "ece", "entropy"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    np.testing.assert_allclose(probs, np.array(ref_probs), rtol=1e-12, atol=1e-15)
    conf = np.max(ref_probs, axis=1)
    assert len({min(int(c * ECE_BINS), ECE_BINS - 1) for c in conf}) >= 10, "confidences should span many bins"
    assert 0.3 < ref["acc"] < 0.9 and ref["ece"] > 0.0


def test_metrics_confident_rows_and_unanswered():
    ll = np.array([[0.0, -800.0, -800.0, -800.0, -800.0],   # conf exactly 1.0: the last bin (14/15, 1]
                   [-1.0, -1.2, -0.3, -2.0, -5.0],
                   [-2.0, -2.0, -1.0, -2.5, -3.0]])
    gold = np.array([0, 1, -1])
    got, _ = metrics_from_logliks(ll, gold)
    ref, _ = reference_metrics(ll, gold)
    for key in ("acc", "nll", "brier", "ece", "entropy"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12, abs=1e-12), key
    assert got["acc"] == 0.5
    none, probs = metrics_from_logliks(ll[2:], np.array([-1]))
    assert none["acc"] is none["nll"] is none["brier"] is none["ece"] is None
    assert none["n"] == 1 and none["n_with_answer"] == 0
    assert none["entropy"] == pytest.approx(reference_metrics(ll[2:], np.array([0]))[0]["entropy"], rel=1e-12)
    assert probs.sum() == pytest.approx(1.0)


# ---------------------------------------------------------------- log-likelihoods vs a float64 model

def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _logprobs_at(model64, ids: list[int], positions: list[int]) -> torch.Tensor:
    """float64 log-softmax rows at `positions` of one unpadded sequence (LM head only where needed:
    a 100k-row head over every position would dominate the run time)."""
    hidden = model64.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return torch.log_softmax(model64.lm_head(hidden[positions]), dim=-1)


def reference_logliks(model64, tok, rows) -> np.ndarray:
    """Per example, unpadded, float64: log p(target | prompt) summed over the target's tokens."""
    out = np.zeros((len(rows), 5))
    for i, r in enumerate(rows):
        prompt = format_prompt(r["question"], r["choices"])
        ctx = _ids(tok, prompt)
        conts = []
        for target in TARGETS:
            full = _ids(tok, prompt + target)
            assert full[: len(ctx)] == ctx
            conts.append(full[len(ctx):])
        if all(len(c) == 1 for c in conts):  # one forward: the last prompt position scores all five
            logp = _logprobs_at(model64, ctx, [len(ctx) - 1])[0]
            out[i] = [logp[c[0]].item() for c in conts]
            continue
        for c, cont in enumerate(conts):
            logp = _logprobs_at(model64, ctx + cont, [len(ctx) - 1 + t for t in range(len(cont))])
            out[i, c] = sum(logp[t, tok_id].item() for t, tok_id in enumerate(cont))
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_olmo2_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_olmo2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_model64(tiny_model):
    return copy.deepcopy(tiny_model).double()


@pytest.fixture(scope="module")
def dev_rows(synthetic_data_dir):
    return load_split(DataConfig(path=str(synthetic_data_dir)), "validation")


def test_evaluate_matches_float64_reference(tiny_model, tiny_model64, tiny_tokenizer, dev_rows):
    assert all(len(_ids(tiny_tokenizer, t)) == 1 for t in TARGETS)  # the one-forward-per-question path
    reqs = build_requests(tiny_tokenizer, dev_rows, 512)
    assert len(reqs) == len(dev_rows) and all(r.choice is None for r in reqs)

    metrics, per_example = evaluate(tiny_model, tiny_tokenizer, dev_rows, batch_size=7, max_length=512,
                                    device="cpu", progress=False)
    got = np.array([e["logliks"] for e in per_example])
    ref = reference_logliks(tiny_model64, tiny_tokenizer, dev_rows)
    assert np.abs(got - ref).max() < 1e-4
    assert np.ptp(ref, axis=1).min() > 1e-3, "targets must be distinguishable for the accuracy check"
    gold = np.array(dev_rows["answer"])
    ref_metrics, _ = metrics_from_logliks(ref, gold)
    assert metrics["acc"] == ref_metrics["acc"]
    assert (got.argmax(1) == ref.argmax(1)).all()
    for key in ("nll", "brier", "entropy"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-4), key
    assert [e["id"] for e in per_example] == dev_rows["id"]
    assert [e["gold"] for e in per_example] == [LABELS[g] for g in gold]


def test_batch_size_does_not_change_logliks(tiny_model, tiny_tokenizer, dev_rows):
    lengths = {len(r.input_ids) for r in build_requests(tiny_tokenizer, dev_rows, 512)}
    assert len(lengths) > 1, "rows of different lengths, so batches are padded"
    one = score_rows(tiny_model, tiny_tokenizer, dev_rows, 1, 512, "cpu", progress=False)
    seven = score_rows(tiny_model, tiny_tokenizer, dev_rows, 7, 512, "cpu", progress=False)
    assert np.abs(one - seven).max() < 1e-5
    assert np.abs(one).min() > 0


def test_packed_questions_match_reference(tiny_model, tiny_model64, tiny_tokenizer):
    """A question packed with multi-token choices of different lengths beside a shorter one whose five
    targets are single tokens (padded in the batch): every choice's log-probs as its own unpadded sequence."""
    tok = tiny_tokenizer
    ctx = _ids(tok, "Question: Where does bako live?\nA. paris\nAnswer:")
    conts = [_ids(tok, " paris tokyo"), _ids(tok, " lima cairo oslo rice"), _ids(tok, " chess")]
    assert len(conts[0]) > 1 and len(conts[1]) > len(conts[0])
    short_ctx = _ids(tok, "Question: What does rimu eat?\nAnswer:")
    single = [[_ids(tok, t)[0]] for t in TARGETS]
    batch = []
    for i, (c, cs) in enumerate(((ctx, conts), (short_ctx, single))):
        packed = pack_choices(c, cs, 512)
        first = len(c) - 1
        row = {"input_ids": packed["input_ids"], "blocks": packed["blocks"], "positions": packed["positions"]}
        assert row["positions"] == list(range(first, len(packed["input_ids"])))
        at = [[p - first for p in ps] for ps in packed["predicts"]]
        batch.append(_Question(i, list(range(len(cs))), row, at, cs))
    assert batch[1].row["input_ids"] == short_ctx and batch[1].row["positions"] == [len(short_ctx) - 1]
    out = choice_logprobs(tiny_model, batch, tok.pad_token_id, "cpu")
    assert [[tuple(lp.shape) for lp in q] for q in out] == [[(len(c),) for c in conts], [(1,)] * 5]

    with torch.no_grad():
        for (c, cs), per_choice in zip(((ctx, conts), (short_ctx, single)), out):
            for cont, lp in zip(cs, per_choice):
                logp = torch.log_softmax(tiny_model64(input_ids=torch.tensor([c + cont[:-1]])).logits[0], -1)
                ref = torch.tensor([logp[len(c) - 1 + t, x].item() for t, x in enumerate(cont)], dtype=torch.float64)
                assert (lp.double() - ref).abs().max().item() < 1e-4


def _byte_tokenizer():
    """Byte-level BPE with no merges: every character is a token, so " A" is two tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, **{ch: i + 2 for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def test_multi_token_targets_through_score_rows(dev_rows):
    tok = _byte_tokenizer()
    assert [len(_ids(tok, t)) for t in TARGETS] == [2] * 5
    model = make_tiny_model(tok, hidden=32, inter=64, heads=2, seed=4)
    rows = dev_rows.select(range(6))
    reqs = build_requests(tok, rows, 512)
    assert len(reqs) == 5 * len(rows) and all(r.choice is not None and len(r.targets) == 2 for r in reqs)
    got = score_rows(model, tok, rows, 4, 512, "cpu", progress=False)
    ref = reference_logliks(copy.deepcopy(model).double(), tok, rows)
    assert np.abs(got - ref).max() < 1e-4
    assert np.ptp(ref, axis=1).min() > 1e-3


# ---------------------------------------------------------------- the eval command

def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_eval_writes_outputs(tiny_olmo2_dir, synthetic_data_dir, dev_rows, tmp_path, capsys):
    out = tmp_path / "eval_teacher"
    code = cli.main(["eval", f"model.path={tiny_olmo2_dir}", f"data.path={synthetic_data_dir}",
                     "eval.batch_size=8", "eval.device=cpu", f"eval.output_dir={out}", f"output_dir={tmp_path}"])
    assert code == 0, capsys.readouterr().err
    res = json.loads((out / "eval.json").read_text())
    m = res["metrics"]
    assert m["n"] == m["n_with_answer"] == len(dev_rows) == 40
    assert 0.0 <= m["acc"] <= 1.0 and m["nll"] > 0 and 0 <= m["ece"] <= 1 and 0 < m["entropy"] <= math.log(5) + 1e-9
    model = res["model"]
    assert model["fingerprint"] == checkpoint_fingerprint(tiny_olmo2_dir)
    loaded = AutoModelForCausalLM.from_pretrained(str(tiny_olmo2_dir))
    assert model["params"] == sum(p.numel() for p in loaded.parameters())
    assert model["bytes_on_disk"] == dir_bytes(tiny_olmo2_dir)
    assert model["intermediate_size"] == loaded.config.intermediate_size and model["pruning_plan_sha256"] is None
    assert res["split"] == "validation" and res["world_size"] == 1 and res["prompt_version"]

    rows = _read_jsonl(out / "examples.jsonl")
    assert [r["id"] for r in rows] == dev_rows["id"]
    ll = np.array([r["logliks"] for r in rows])
    for r in rows:
        assert sum(r["probs"]) == pytest.approx(1.0, abs=1e-9)
        assert r["pred"] == LABELS[int(np.argmax(r["logliks"]))]
        assert int(np.argmax(r["probs"])) == int(np.argmax(r["logliks"]))
    assert [r["gold"] for r in rows] == [LABELS[a] for a in dev_rows["answer"]]
    recomputed, _ = metrics_from_logliks(ll, np.array(dev_rows["answer"]))
    assert recomputed == pytest.approx({k: m[k] for k in recomputed})
    assert m["headline"] == "acc" and m["acc"] == np.mean([r["pred"] == r["gold"] for r in rows])

    saved = load_config(out / "config.yaml")
    assert saved.eval.output_dir == str(out) and saved.model.path == str(tiny_olmo2_dir)
    assert saved.eval.batch_size == 8


def test_cli_eval_pruned_model_and_unanswered_split(tiny_olmo2_dir, synthetic_data_dir, tmp_path):
    plan = prune_checkpoint(tiny_olmo2_dir, tmp_path / "pruned", 0.5, log=lambda *a: None)
    code = cli.main(["eval", f"model.path={tiny_olmo2_dir}", f"eval.model={tmp_path / 'pruned'}",
                     f"data.path={synthetic_data_dir}", "eval.split=test", "eval.limit=5",
                     f"output_dir={tmp_path / 'run'}"])
    assert code == 0
    out = tmp_path / "run" / "eval" / "pruned"  # default: <output_dir>/eval/<checkpoint dir name>
    res = json.loads((out / "eval.json").read_text())
    assert res["model"]["pruning_plan_sha256"] == plan["plan_sha256"]
    assert res["model"]["intermediate_size"] == plan["intermediate_size_after"]
    assert res["metrics"]["n"] == 5 and res["metrics"]["acc"] is None and res["metrics"]["entropy"] > 0
    rows = _read_jsonl(out / "examples.jsonl")
    assert len(rows) == 5 and all(r["gold"] is None for r in rows)


def test_cli_eval_real_csqa_with_olmo2_tokenizer(olmo2_tokenizer, csqa_dir, tmp_path):
    model = make_tiny_model(olmo2_tokenizer, hidden=32, inter=64, heads=2, seed=2)
    ckpt = tmp_path / "olmo2_tiny"
    model.save_pretrained(ckpt)
    olmo2_tokenizer.save_pretrained(ckpt)
    out = tmp_path / "eval"
    code = cli.main(["eval", f"model.path={ckpt}", f"data.path={csqa_dir}", "eval.limit=20", "eval.batch_size=8",
                     "eval.device=cpu", f"eval.output_dir={out}"])
    assert code == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["metrics"]["n"] == 20 and res["model"]["params"] == sum(p.numel() for p in model.parameters())
    rows = _read_jsonl(out / "examples.jsonl")
    assert rows[0]["id"] == "1afa02df02c908a558b4036e80242fac" and rows[0]["gold"] == "A"
    dev = load_split(DataConfig(path=str(csqa_dir)), "validation").select(range(20))
    ref = reference_logliks(copy.deepcopy(model).double(), olmo2_tokenizer, dev)
    got = np.array([r["logliks"] for r in rows])
    assert np.abs(got - ref).max() < 1e-4
    assert res["metrics"]["acc"] == metrics_from_logliks(ref, np.array(dev["answer"]))[0]["acc"]
