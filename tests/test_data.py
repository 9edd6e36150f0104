"""CommonsenseQA reading, normalisation, lm-eval prompt format, subsampling and tokenisation."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from distill_dist.config import DataConfig
from distill_dist.data import (LABELS, OFFICIAL_FILES, TARGETS, encode_choices, format_prompt, load_split,
                               read_jsonl, subsample)
from distill_dist.errors import DataError

REAL_COUNTS = {"train": 9741, "validation": 1221, "test": 1140}


def _row(**over) -> dict:
    row = {"answerKey": "B", "id": "q1",
           "question": {"question_concept": "c", "stem": "Where is it?",
                        "choices": [{"label": l, "text": t} for l, t in zip(LABELS, ["a", "b", "c", "d", "e"])]}}
    row.update(over)
    return row


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---------------------------------------------------------------- the real files

@pytest.fixture(scope="module")
def real_splits(csqa_dir):
    cfg = DataConfig(source="jsonl", path=str(csqa_dir))
    return {split: load_split(cfg, split) for split in REAL_COUNTS}


def test_real_csqa_row_counts_and_answers(real_splits):
    for split, n in REAL_COUNTS.items():
        ds = real_splits[split]
        assert len(ds) == n, split
        assert all(len(c) == 5 for c in ds["choices"]), split
        assert len(set(ds["id"])) == n, f"{split}: ids must be unique"
    assert set(real_splits["test"]["answer"]) == {-1}
    for split in ("train", "validation"):
        answers = real_splits[split]["answer"]
        assert set(answers) == {0, 1, 2, 3, 4}, split


def test_real_dev_first_row_prompt_is_lm_eval_format(real_splits):
    row = real_splits["validation"][0]
    assert row["id"] == "1afa02df02c908a558b4036e80242fac"
    assert row["answer"] == 0
    expected = ("Question: A revolving door is convenient for two direction travel, but it also serves as a "
                "security measure at a what?\n"
                "A. bank\nB. library\nC. department store\nD. mall\nE. new york\nAnswer:")
    assert format_prompt(row["question"], row["choices"]) == expected


def test_prompt_strips_question_but_not_choices():
    got = format_prompt("  \tWhat is  big?  \n", ["x y", "b", " c", "d", "e "])
    assert got == "Question: What is  big?\nA. x y\nB. b\nC.  c\nD. d\nE. e \nAnswer:"
    assert TARGETS == (" A", " B", " C", " D", " E")


def test_hand_made_row_through_reader(tmp_path):
    row = _row(question={"stem": "   Why so?\n", "choices": [{"label": l, "text": l.lower() * 2} for l in LABELS]})
    ds = read_jsonl(_write_lines(tmp_path / "f.jsonl", [json.dumps(row)]))
    r = ds[0]
    assert r == {"id": "q1", "question": "   Why so?\n", "choices": ["aa", "bb", "cc", "dd", "ee"], "answer": 1}
    assert format_prompt(r["question"], r["choices"]) == "Question: Why so?\nA. aa\nB. bb\nC. cc\nD. dd\nE. ee\nAnswer:"


# ---------------------------------------------------------------- malformed files

def _choices(labels):
    return [{"label": l, "text": f"t{i}"} for i, l in enumerate(labels)]


MALFORMED = {
    "invalid_json": ('{"id": "x", "question": ', "invalid JSON"),
    "missing_id": (json.dumps({k: v for k, v in _row().items() if k != "id"}), "missing field 'id'"),
    "missing_stem": (json.dumps(_row(question={"choices": _choices(LABELS)})), "missing field 'question.stem'"),
    "four_choices": (json.dumps(_row(question={"stem": "q", "choices": _choices("ABCD")})),
                     "expected 5 choices, found 4"),
    "answer_F": (json.dumps(_row(answerKey="F")), "answerKey 'F' is not one of the choice labels"),
    "labels_out_of_order": (json.dumps(_row(question={"stem": "q", "choices": _choices("ABDCE")})),
                            "choice labels must be A-E in order"),
    "choice_without_text": (json.dumps(_row(question={"stem": "q", "choices": [{"label": l} for l in LABELS]})),
                            "needs 'label' and 'text'"),
    "not_an_object": ("[1, 2, 3]", "expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_row_names_file_and_line(tmp_path, case):
    bad, expected = MALFORMED[case]
    path = _write_lines(tmp_path / "dev_rand_split.jsonl", [json.dumps(_row(id="ok1")), json.dumps(_row(id="ok2")), bad])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    msg = str(e.value)
    assert msg.startswith(f"{path} line 3: "), msg
    assert expected in msg


def test_blank_lines_skipped_without_shifting_line_numbers(tmp_path):
    lines = [json.dumps(_row(id="a")), "", "   ", json.dumps(_row(id="b")), "", json.dumps(_row(id="c", answerKey="Z"))]
    path = _write_lines(tmp_path / "x.jsonl", lines)
    with pytest.raises(DataError, match=rf"^{path} line 6: answerKey 'Z'"):
        read_jsonl(path)
    ok = _write_lines(tmp_path / "y.jsonl", lines[:5])
    assert read_jsonl(ok)["id"] == ["a", "b"]


def test_missing_answer_key_means_unanswered(tmp_path):
    row = _row()
    del row["answerKey"]
    ds = read_jsonl(_write_lines(tmp_path / "t.jsonl", [json.dumps(row), json.dumps(_row(answerKey=""))]))
    assert ds["answer"] == [-1, -1]


def test_missing_file_and_dir(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"'data\.path'"):
        load_split(DataConfig(path=str(tmp_path / "nodir")), "validation")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_split(DataConfig(path=str(tmp_path)), "dev")


# ---------------------------------------------------------------- the tau/commonsense_qa schema

def _to_hf_schema(row: dict) -> dict:
    q = row["question"]
    return {"id": row["id"], "question": q["stem"], "question_concept": "concept",
            "choices": {"label": [c["label"] for c in q["choices"]], "text": [c["text"] for c in q["choices"]]},
            "answerKey": row.get("answerKey", "")}


def test_saved_datasetdict_matches_jsonl(synthetic_data_dir, tmp_path):
    splits = {}
    for split, name in OFFICIAL_FILES.items():
        rows = [json.loads(line) for line in (synthetic_data_dir / name).read_text().splitlines()]
        splits[split] = datasets.Dataset.from_list([_to_hf_schema(r) for r in rows])
    saved = tmp_path / "csqa_hf"
    datasets.DatasetDict(splits).save_to_disk(str(saved))

    from_jsonl = DataConfig(source="jsonl", path=str(synthetic_data_dir))
    from_disk = DataConfig(source="disk", path=str(saved))
    for split in OFFICIAL_FILES:
        a, b = load_split(from_jsonl, split).to_list(), load_split(from_disk, split).to_list()
        assert a == b, split
        assert len(a) > 0
    assert {r["answer"] for r in load_split(from_disk, "test")} == {-1}
    # subsampling applies the same way to both sources
    assert (load_split(DataConfig(source="disk", path=str(saved), train_examples=17, seed=3), "train")["id"]
            == load_split(DataConfig(source="jsonl", path=str(synthetic_data_dir), train_examples=17, seed=3), "train")["id"])


def test_saved_dataset_bad_row_names_split_and_row(tmp_path):
    good = _to_hf_schema(_row(id="g"))
    bad = _to_hf_schema(_row(id="b", answerKey="Q"))
    path = tmp_path / "hf"
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([good, good, bad])}).save_to_disk(str(path))
    with pytest.raises(DataError, match=r"\[validation\] row 2: answerKey 'Q'"):
        load_split(DataConfig(source="disk", path=str(path)), "validation")
    with pytest.raises(DataError, match="has no split 'train'"):
        load_split(DataConfig(source="disk", path=str(path)), "train")
    with pytest.raises(DataError, match="no saved dataset"):
        load_split(DataConfig(source="disk", path=str(tmp_path / "none")), "train")


# ---------------------------------------------------------------- subsampling

def _train_ids(data_dir, n, seed):
    return load_split(DataConfig(path=str(data_dir), train_examples=n, seed=seed), "train")["id"]


def test_subsample_deterministic_prefix_and_seeded(synthetic_data_dir):
    a = _train_ids(synthetic_data_dir, 50, 1)
    assert a == _train_ids(synthetic_data_dir, 50, 1)
    assert len(a) == len(set(a)) == 50
    assert a != _train_ids(synthetic_data_dir, 50, 2)
    assert _train_ids(synthetic_data_dir, 20, 1) == a[:20]
    assert _train_ids(synthetic_data_dir, 200, 1)[:50] == a
    full = load_split(DataConfig(path=str(synthetic_data_dir)), "train")["id"]
    assert a != full[:50], "a subsample is shuffled, not the first rows"
    assert set(a) <= set(full)
    # only train is subsampled
    assert len(load_split(DataConfig(path=str(synthetic_data_dir), train_examples=5), "validation")) == 40


def test_subsample_too_large(synthetic_data_dir):
    with pytest.raises(DataError, match=r"'data\.train_examples' = 201: the split has only 200 rows"):
        _train_ids(synthetic_data_dir, 201, 0)
    ds = load_split(DataConfig(path=str(synthetic_data_dir)), "validation")
    with pytest.raises(DataError):
        subsample(ds, len(ds) + 1, 0)


def test_holdout_is_the_train_tail_and_training_never_reads_it(synthetic_data_dir):
    root = str(synthetic_data_dir)
    full = load_split(DataConfig(path=root), "train")["id"]
    held = load_split(DataConfig(path=root, holdout=30), "holdout")["id"]
    kept = load_split(DataConfig(path=root, holdout=30), "train")["id"]
    assert held == full[-30:] and kept == full[:-30]
    sub = load_split(DataConfig(path=root, holdout=30, train_examples=100, seed=3), "train")["id"]
    assert len(set(sub)) == 100 and not set(sub) & set(held)
    assert sub != kept[:100], "the subsample is still drawn (seeded) from the rows left to train on"
    assert load_split(DataConfig(path=root, holdout=30), "validation")["id"] == \
        load_split(DataConfig(path=root), "validation")["id"]


def test_holdout_refusals(synthetic_data_dir):
    with pytest.raises(DataError, match=r"eval\.split=holdout needs config field 'data\.holdout' > 0"):
        load_split(DataConfig(path=str(synthetic_data_dir)), "holdout")
    with pytest.raises(DataError, match=r"'data\.holdout' = 200: the train split has only 200 rows"):
        load_split(DataConfig(path=str(synthetic_data_dir), holdout=200), "train")


# ---------------------------------------------------------------- tokenisation

def test_encode_choices_real_olmo2_tokenizer(olmo2_tokenizer, real_splits):
    tok = olmo2_tokenizer
    target_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TARGETS]
    assert all(len(t) == 1 for t in target_ids)
    assert len({t[0] for t in target_ids}) == 5
    for r in real_splits["validation"].select(range(40)):
        prompt = format_prompt(r["question"], r["choices"])
        ctx, conts = encode_choices(tok, prompt)
        assert ctx == tok(prompt, add_special_tokens=False)["input_ids"]
        assert [len(c) for c in conts] == [1] * 5
        assert conts == target_ids
        for t, c in zip(TARGETS, conts):
            assert ctx + c == tok(prompt + t, add_special_tokens=False)["input_ids"]
    # OLMo2's tokenizer.json has no BOS and adds no special tokens: auto = false; true is refused
    assert tok.bos_token_id is None
    assert encode_choices(tok, "Question: x\nAnswer:") == encode_choices(tok, "Question: x\nAnswer:", add_bos=False)
    with pytest.raises(DataError, match=r"^config field 'data.add_bos' = true: the tokenizer has no BOS token"):
        encode_choices(tok, "Question: x\nAnswer:", add_bos=True)


@pytest.mark.parametrize("fmt", ["mc", "cloze"])
def test_batched_encoding_equals_one_call_per_string(olmo2_tokenizer, tinystories_dir, real_splits, fmt):
    """encode_rows tokenises every row in two batched calls; the ids are those of one tokenizer call per
    string (lm-eval's way), for byte-level BPE (OLMo2) and sentencepiece with a BOS (the Llama)."""
    from distill_dist.data import encode_rows, prompt_and_targets
    from distill_dist.models import load_tokenizer

    rows = list(real_splits["train"].select(range(120)))
    for tok in (olmo2_tokenizer, load_tokenizer(str(tinystories_dir))):
        expected = []
        for r in rows:
            prompt, targets = prompt_and_targets(r, fmt)
            ctx = tok(prompt.rstrip())["input_ids"]
            expected.append((ctx, [tok(prompt.rstrip() + t)["input_ids"][len(ctx):] for t in targets]))
        assert encode_rows(tok, rows, fmt) == expected


def test_encode_choices_takes_the_tail_of_the_joint_encoding(tiny_tokenizer):
    """lm-eval's rule: continuation = joint ids after len(context ids), even when a merge crosses the boundary."""
    tok = tiny_tokenizer

    def enc(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    prompt = "Question: q\nAnsw"
    # precondition: "Answ" + "er" merges across the boundary, so the whole string does not start with ctx
    whole = enc(prompt + "er: A")
    assert whole[: len(enc(prompt))] != enc(prompt) and len(whole) == len(enc(prompt)) + 1
    ctx, conts = encode_choices(tok, prompt, targets=("er: A", " B"))
    assert ctx == enc(prompt)
    assert conts[0] == whole[-1:] == enc(" A")  # the model reads ctx + " A": "er:" is lost in the split
    assert ctx + conts[1] == enc(prompt + " B")  # no merge: context + continuation is the joint encoding
    # a merge that leaves no tokens after len(ctx) has nothing to score (lm-eval asserts the same)
    with pytest.raises(DataError, match=r"^target 'er' adds no tokens after the prompt"):
        encode_choices(tok, prompt, targets=("er",))


def test_encode_choices_moves_trailing_space_to_the_target(tiny_tokenizer):
    tok = tiny_tokenizer
    ctx, conts = encode_choices(tok, "Question: q\nAnswer: ", targets=("A", "B"))
    assert ctx == encode_choices(tok, "Question: q\nAnswer:")[0]
    assert conts == encode_choices(tok, "Question: q\nAnswer:", targets=(" A", " B"))[1]


def test_encode_choices_bad_add_bos(tiny_tokenizer):
    with pytest.raises(DataError, match=r"^config field 'data.add_bos' = 'yes': expected auto, true or false$"):
        encode_choices(tiny_tokenizer, "Question: q\nAnswer:", add_bos="yes")


def test_non_string_answer_key_is_a_data_error(tmp_path):
    path = _write_lines(tmp_path / "n.jsonl", [json.dumps(_row(answerKey=1))])
    with pytest.raises(DataError, match=rf"^{path} line 1: answerKey 1 "):
        read_jsonl(path)
