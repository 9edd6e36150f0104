"""A synthetic task in CommonsenseQA's exact file format, and a tokenizer trained on it.

The CPU demo needs a teacher that is clearly above chance after a minute of training, with no
downloads: "Which of these is a <category>?" with one member of the category among four distractors
is learnable by a two-layer model, and exercises the real jsonl loader and prompt format.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .data import LABELS, OFFICIAL_FILES, format_prompt
from .fileio import atomic_write_text

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "animal": ["horse", "tiger", "rabbit", "wolf", "otter", "camel", "zebra", "mouse", "sheep", "goat"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "brown", "pink"],
    "tool": ["hammer", "wrench", "saw", "drill", "chisel", "shovel", "rake", "pliers", "axe", "file"],
    "vehicle": ["car", "truck", "bus", "train", "bicycle", "tram", "scooter", "van", "boat", "plane"],
    "instrument": ["piano", "violin", "drum", "flute", "guitar", "trumpet", "harp", "cello", "oboe", "banjo"],
    "country": ["france", "japan", "brazil", "kenya", "canada", "india", "peru", "norway", "egypt", "chile"],
    "sport": ["tennis", "soccer", "hockey", "rugby", "golf", "boxing", "rowing", "skiing", "cricket", "judo"],
}


def make_rows(n: int, seed: int, with_answers: bool = True, prefix: str = "syn") -> list[dict]:
    rng = random.Random(seed)
    cats = sorted(CATEGORIES)
    rows = []
    for i in range(n):
        cat = rng.choice(cats)
        others = rng.sample([c for c in cats if c != cat], 4)
        options = [rng.choice(CATEGORIES[cat])] + [rng.choice(CATEGORIES[c]) for c in others]
        gold = rng.randrange(5)
        options[0], options[gold] = options[gold], options[0]
        row = {"id": f"{prefix}-{seed}-{i}",
               "question": {"stem": f"Which of these is a {cat}?",
                            "choices": [{"label": l, "text": t} for l, t in zip(LABELS, options)]}}
        if with_answers:
            row["answerKey"] = LABELS[gold]
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
