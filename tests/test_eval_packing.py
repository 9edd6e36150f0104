"""The shared-prompt evaluation: a question's prompt once, each choice a block after it (packing.py), against
the unshared path (one unpadded sequence per lm-eval request, here in the test) on real models and the real
CSQA dev questions, in data.format mc and cloze, with sdpa and eager attention, and on a Gemma3 whose
sliding window is shorter than the questions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_model
from transformers import AutoModelForCausalLM

from distill_dist.config import DataConfig
from distill_dist.data import collate, encode_rows, load_split
from distill_dist.evaluate import build_requests, packed_questions, score_rows
from distill_dist.models import load_tokenizer
from distill_dist.packing import block_attention, pack_choices


@pytest.fixture(scope="module")
def dev(csqa_dir):
    return list(load_split(DataConfig(path=str(csqa_dir)), "validation").select(range(60)))


@torch.no_grad()
def unshared_logliks(model, tok, rows, max_length: int, fmt: str) -> np.ndarray:
    """The unshared path: each lm-eval request (`build_requests`) as its own unpadded float32 sequence."""
    out = np.zeros((len(rows), 5))
    for r in build_requests(tok, rows, max_length, fmt=fmt):
        hidden = model.model(input_ids=torch.tensor([r.input_ids]), use_cache=False).last_hidden_state[0]
        logp = torch.log_softmax(model.lm_head(hidden[r.positions]).float(), dim=-1).double()
        if r.choice is None:
            out[r.example] = logp[0, r.targets].numpy()
        else:
            out[r.example, r.choice] = logp[torch.arange(len(r.targets)), r.targets].sum().item()
    return out


def test_block_attention_by_hand():
    rows = [{"input_ids": [5, 6, 7, 8, 9, 10], "blocks": [2, 0, 1], "positions": [2]},
            {"input_ids": [5, 6], "positions": [1]}]
    mask, pos = block_attention(rows, 6)
    # row 0: prompt 0-2, block A = 3-4, (empty block), block C = 5; row 1: two tokens, then padding
    want0 = [[1, 0, 0, 0, 0, 0],
             [1, 1, 0, 0, 0, 0],
             [1, 1, 1, 0, 0, 0],
             [1, 1, 1, 1, 0, 0],
             [1, 1, 1, 1, 1, 0],
             [1, 1, 1, 0, 0, 1]]
    want1 = [[1, 0, 0, 0, 0, 0],
             [1, 1, 0, 0, 0, 0],
             [0, 0, 1, 0, 0, 0],  # padding: itself only
             [0, 0, 0, 1, 0, 0],
             [0, 0, 0, 0, 1, 0],
             [0, 0, 0, 0, 0, 1]]
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    assert mask[0, 0].int().tolist() == want0 and mask[1, 0].int().tolist() == want1
    assert pos.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 0, 0, 0, 0]]
    batch = collate(rows, 0, "cpu")
    assert torch.equal(batch["attention_mask"], mask) and torch.equal(batch["position_ids"], pos)
    plain = collate([rows[1]], 0, "cpu")  # no blocks anywhere: the usual [B, T] mask, no position ids
    assert plain["attention_mask"].tolist() == [[1, 1]] and "position_ids" not in plain


@pytest.mark.parametrize("max_length", [512, 24])
def test_each_choice_reads_its_lm_eval_input(olmo2_tokenizer, dev, max_length):
    """Read along its own block, a packed row is exactly lm-eval's input for that choice; choices whose left
    truncation differs (max_length 24) get rows of their own, and every choice is scored once."""
    tok = olmo2_tokenizer
    questions = packed_questions(tok, dev, max_length, fmt="cloze")
    encoded = encode_rows(tok, dev, "cloze")
    seen, shared_rows = set(), 0
    for q in questions:
        prompt_len = len(q.row["input_ids"]) - sum(q.row["blocks"])
        starts = np.cumsum([prompt_len] + q.row["blocks"][:-1]).tolist()
        shared_rows += len(q.choices) == 5
        for k, j in enumerate(q.choices):
            ctx, cont = encoded[q.example][0], encoded[q.example][1][j]
            own = q.row["input_ids"][:prompt_len] + q.row["input_ids"][starts[k]: starts[k] + q.row["blocks"][k]]
            assert own == (ctx + cont)[-(max_length + 1):][:-1]
            assert q.targets[k] == cont and len(q.at[k]) == len(cont)
            predicts = [q.row["positions"][i] for i in q.at[k]]
            assert predicts == [prompt_len - 1] + list(range(starts[k], starts[k] + len(cont) - 1))
            seen.add((q.example, j))
    assert seen == {(i, j) for i in range(len(dev)) for j in range(5)}
    if max_length == 512:
        assert len(questions) == len(dev) == shared_rows
    else:
        assert len(dev) < len(questions) and shared_rows > 0, "the sample must hold both kinds"


def _olmo2(olmo2_tokenizer, attn="sdpa"):
    model = make_tiny_model(olmo2_tokenizer, hidden=32, inter=64, heads=2, seed=3)
    model.set_attn_implementation(attn)
    return model, olmo2_tokenizer


def _tinystories(tinystories_dir, attn="sdpa"):
    model = AutoModelForCausalLM.from_pretrained(str(tinystories_dir), dtype=torch.float32, attn_implementation=attn)
    return model.eval(), load_tokenizer(str(tinystories_dir))


# TinyStories-656K puts CSQA answers at up to -60 nats, where one float32 ulp is 4e-6 and the unshared path
# itself moves by 1.1e-5 between batch sizes 1 and 8 (measured on the first 40 dev questions): there a choice
# is held to 2e-5. max_length 24 cuts every prompt from the left (cloze: choices of different lengths apart).
@pytest.mark.parametrize("which,attn,fmt,max_length,tol", [
    ("olmo2", "sdpa", "mc", 512, 1e-5), ("olmo2", "sdpa", "cloze", 512, 1e-5), ("olmo2", "sdpa", "cloze", 24, 1e-5),
    ("olmo2", "eager", "cloze", 512, 1e-5), ("tinystories", "sdpa", "mc", 512, 2e-5),
    ("tinystories", "sdpa", "cloze", 512, 2e-5), ("tinystories", "sdpa", "mc", 24, 2e-5)])
def test_shared_prompt_equals_unshared_path(which, attn, fmt, max_length, tol, dev, olmo2_tokenizer, tinystories_dir):
    model, tok = _olmo2(olmo2_tokenizer, attn) if which == "olmo2" else _tinystories(tinystories_dir, attn)
    rows = dev[:30]
    ref = unshared_logliks(model, tok, rows, max_length, fmt)
    got = score_rows(model, tok, rows, 8, max_length, "cpu", progress=False, fmt=fmt)
    assert np.abs(got - ref).max() < tol, np.abs(got - ref).max()
    assert np.ptp(ref, axis=1).min() > 1e-3, "choices must differ"


def test_gemma3_sliding_layers_packed(olmo2_tokenizer, dev):
    """Gemma3 with a sliding window of 8 (shorter than every prompt): its sliding layers get the packed mask
    restricted to the window, so each choice equals its own sequence; a model without the window differs."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok, rows = olmo2_tokenizer, dev[:20]

    def gemma(window: int):
        cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=window,
                               layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                               pad_token_id=tok.pad_token_id)
        torch.manual_seed(0)
        model = Gemma3ForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.1)
        return model

    model = gemma(8)
    assert min(len(q.row["input_ids"]) for q in packed_questions(tok, rows, 512, fmt="cloze")) > 8
    ref = unshared_logliks(model, tok, rows, 512, "cloze")
    got = score_rows(model, tok, rows, 8, 512, "cpu", progress=False, fmt="cloze")
    assert np.abs(got - ref).max() < 1e-5
    assert np.abs(unshared_logliks(gemma(4096), tok, rows, 512, "cloze") - ref).max() > 1e-3, "the window must bite"


def test_a_continuation_longer_than_max_length_is_one_line(olmo2_tokenizer):
    from distill_dist.errors import DataError

    with pytest.raises(DataError, match=r"^question q7: a continuation of 5 tokens leaves no room for the prompt "
                                        r"in data\.max_length = 4$"):
        pack_choices([1, 2, 3], [[4], [5, 6, 7, 8, 9]], 4, "question q7")


def test_packed_kl_rows_train_as_each_choice_read_alone(olmo2_tokenizer, csqa_dir):
    """The cloze KL arm's packed rows through the training modules (student loss, teacher hidden states): the
    same loss as every supervised position taken from its own unpacked sequence (prompt + that choice)."""
    from distill_dist.data import build_train_examples
    from distill_dist.engines import StudentWithLoss, TeacherHidden
    from distill_dist.losses import DenseTeacher, LossSpec, fused_linear_loss

    tok = olmo2_tokenizer
    rows = build_train_examples(tok, load_split(DataConfig(path=str(csqa_dir)), "train").select(range(6)), "kl",
                                "answer", 512, fmt="cloze")
    assert any(sum(r["blocks"]) for r in rows)
    student, teacher = (make_tiny_model(tok, hidden=32, inter=64, heads=2, seed=s) for s in (5, 6))
    batch = collate(rows, tok.pad_token_id, "cpu")
    with torch.no_grad():
        h_t = TeacherHidden(teacher)(**batch)
        loss = StudentWithLoss(student, LossSpec("kl"), 64)(**batch, teacher=DenseTeacher(h_t, teacher.lm_head.weight))

        def alone(model, r, p):  # the hidden state at packed position p, from the sequence it belongs to
            prompt = len(r["input_ids"]) - sum(r["blocks"])
            start = prompt
            for n in r["blocks"]:
                if start <= p < start + n:
                    seq = r["input_ids"][:prompt] + r["input_ids"][start: p + 1]
                    break
                start += n
            else:
                seq = r["input_ids"][: p + 1]
            return model.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -1]

        ref_s = torch.stack([alone(student, r, p) for r in rows for p in r["positions"]])
        ref_t = torch.stack([alone(teacher, r, p) for r in rows for p in r["positions"]])
        ref = fused_linear_loss(ref_s, student.lm_head.weight, LossSpec("kl"),
                                teacher=DenseTeacher(ref_t, teacher.lm_head.weight))
    assert ref.item() > 0.1
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()


def test_packed_rows_on_an_attention_without_masks_are_one_line(olmo2_tokenizer):
    from distill_dist.errors import CheckpointError
    from distill_dist.packing import body_hidden

    model = make_tiny_model(olmo2_tokenizer, hidden=32, inter=64, heads=2)
    model.config._attn_implementation = "flash_attention_2"  # its kernels take no 4D mask (none installed here)
    b = collate([{"input_ids": [1, 2, 3, 4], "blocks": [1], "positions": [2]}], 0, "cpu")
    with pytest.raises(CheckpointError, match=r"^packed rows \(a question's choices after its prompt\) need sdpa or "
                                              r"eager attention; the model runs flash_attention_2$"):
        body_hidden(model, b["input_ids"], b["attention_mask"], b["position_ids"])
