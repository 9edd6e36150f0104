"""A synthetic task in CommonsenseQA's exact file format, and a tokenizer trained on it.

The CPU demo needs a teacher that is clearly above chance after a minute of training, with no
downloads: questions about a fixed table of facts ("Where does <person> live?") are learnable by a
two-layer model in seconds, and exercise the real jsonl loader and prompt format. (Harder variants,
with the options shuffled per question, need the model to match the recalled fact against the
options and take thousands of steps: too slow for a CPU demo.)
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .data import LABELS, OFFICIAL_FILES, format_prompt
from .fileio import atomic_write_text

# 240 made-up two-syllable names ("bako", "rimu", ...): more facts than a pruned MLP can hold.
_SYL = ["ba", "ko", "ri", "mu", "te", "lo", "si", "na", "du", "fe", "gi", "po", "ze", "ha", "vu", "ja"]
PEOPLE = [a + b for a in _SYL for b in _SYL if a != b][:240]
# Four relations, each with its five answers always listed in the same order: the answer letter is a
# fact about the person that the model can only produce by having memorised it, which is what MLP
# blocks hold and what pruning them removes.
RELATIONS = {
    "Where does {} live?": ["paris", "tokyo", "lima", "cairo", "oslo"],
    "What does {} eat?": ["rice", "bread", "soup", "fish", "beans"],
    "What does {} play?": ["chess", "tennis", "golf", "cards", "piano"],
    "What does {} drive?": ["a car", "a bus", "a van", "a truck", "a tram"],
}
FACTS = {(q, p): random.Random(f"{q}|{p}").randrange(5) for q in RELATIONS for p in PEOPLE}


def make_rows(n: int, seed: int, with_answers: bool = True, prefix: str = "syn") -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        template, person = rng.choice(sorted(RELATIONS)), rng.choice(PEOPLE)
        row = {"id": f"{prefix}-{seed}-{i}",
               "question": {"stem": template.format(person),
                            "choices": [{"label": l, "text": t} for l, t in zip(LABELS, RELATIONS[template])]}}
        if with_answers:
            row["answerKey"] = LABELS[FACTS[(template, person)]]
        rows.append(row)
    return rows


def write_synthetic_csqa(out_dir: str | Path, n_train: int = 2000, n_dev: int = 300, n_test: int = 100,
                         seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    splits = {"train": make_rows(n_train, seed), "validation": make_rows(n_dev, seed + 1),
              "test": make_rows(n_test, seed + 2, with_answers=False)}
    for split, rows in splits.items():
        atomic_write_text(out_dir / OFFICIAL_FILES[split], "".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def train_tokenizer(data_dir: str | Path, vocab_size: int = 512):
    """A byte-level BPE (like OLMo2's) trained on the synthetic prompts, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in OFFICIAL_FILES.values():
        for line in Path(data_dir, name).read_text().splitlines():
            q = json.loads(line)["question"]
            texts.append(format_prompt(q["stem"], [c["text"] for c in q["choices"]]) + " A B C D E")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
