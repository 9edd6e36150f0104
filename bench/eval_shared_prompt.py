"""Benchmark: `distill-dist eval` wall time of two source trees, back to back, on the same models and questions.

    python bench/eval_shared_prompt.py --before OLD_TREE/src [--after src] [--limit 300] [--repeats 1]

Models: a random tiny OLMo2 (hidden 64, MLP 192, 2 layers) on the real OLMo2 tokenizer (vocab 100352), and
the real TinyStories-656K (Llama); questions: the first --limit CommonsenseQA dev questions, in data.format mc
and cloze. Each (model, format) runs the two trees alternately, each eval its own process at
OMP_NUM_THREADS=1; the figure is the fastest of --repeats of eval.json's wall_s (scoring only, model load
excluded); the per-choice log-likelihoods of the two trees are compared, and the token positions the model
body reads are counted both ways (lm-eval's requests, max_length 512, vs this tree's packed rows). Used to time the shared-prompt evaluation (packing.py)
against one sequence per choice.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_models(shared: Path, out: Path) -> dict[str, Path]:
    import torch

    from distill_dist.config import TinyModelConfig
    from distill_dist.models import build_tiny_model, load_tokenizer

    tok = load_tokenizer(str(shared / "tokenizers" / "olmo2" / "tokenizer.json"))
    model = build_tiny_model(TinyModelConfig(hidden_size=64, intermediate_size=192, num_layers=2, num_heads=4,
                                             num_kv_heads=4, seed=0), tok)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # weights far from the init's near-uniform distribution (as tests/conftest.py does)
        for _, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            p.copy_(noise * 0.15 if p.ndim >= 2 else 1 + 0.2 * noise)
    model.save_pretrained(out / "olmo2_tiny")
    tok.save_pretrained(out / "olmo2_tiny")
    return {"olmo2_tiny": out / "olmo2_tiny", "tinystories_656k": shared / "models" / "TinyStories-656K"}


def run_eval(src: Path, model: Path, data: Path, fmt: str, limit: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "distill_dist.cli", "eval", f"model.path={model}", f"data.path={data}",
           f"data.format={fmt}", f"eval.limit={limit}", "eval.batch_size=16", "eval.device=cpu",
           f"eval.output_dir={out}", f"output_dir={out}"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    res = json.loads((out / "eval.json").read_text())
    logliks = [json.loads(line)["logliks"] for line in (out / "examples.jsonl").read_text().splitlines()]
    return {"wall_s": res["wall_s"], "logliks": logliks, "headline": res["metrics"][res["metrics"]["headline"]]}


def body_tokens(model: Path, data: Path, fmt: str, limit: int) -> tuple[int, int]:
    """Token positions the model body reads: one sequence per lm-eval request vs the packed rows (this tree's)."""
    from distill_dist.config import DataConfig
    from distill_dist.data import load_split
    from distill_dist.evaluate import build_requests, packed_questions
    from distill_dist.models import load_tokenizer

    tok, rows = load_tokenizer(str(model)), list(load_split(DataConfig(path=str(data)), "validation"))[:limit]
    return (sum(len(r.input_ids) for r in build_requests(tok, rows, 512, fmt=fmt)),
            sum(len(q.row["input_ids"]) for q in packed_questions(tok, rows, 512, fmt=fmt)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True, help="src/ of the tree to compare against")
    ap.add_argument("--after", type=Path, default=REPO / "src")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--limit", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        models = build_models(args.shared, Path(tmp))
        print(f"{'model':18} {'format':6} {'before s':>9} {'after s':>8} {'speed-up':>8} {'max|dll|':>9} "
              f"{'tokens before':>13} {'after':>7}")
        for name, path in models.items():
            for fmt in ("mc", "cloze"):
                walls = {"before": [], "after": []}
                for k in range(args.repeats):
                    res = {}
                    for which in ("before", "after"):
                        res[which] = run_eval(getattr(args, which), path, args.shared / "commonsense_qa", fmt,
                                              args.limit, Path(tmp) / f"{name}-{fmt}-{which}-{k}")
                        walls[which].append(res[which]["wall_s"])
                    delta = max(abs(a - b) for ra, rb in zip(res["before"]["logliks"], res["after"]["logliks"])
                                for a, b in zip(ra, rb))
                before, after = min(walls["before"]), min(walls["after"])
                tokens = body_tokens(path, args.shared / "commonsense_qa", fmt, args.limit)
                print(f"{name:18} {fmt:6} {before:9.2f} {after:8.2f} {before / after:7.2f}x {delta:9.1e} "
                      f"{tokens[0]:13d} {tokens[1]:7d}", flush=True)


if __name__ == "__main__":
    main()
