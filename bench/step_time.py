"""Benchmark: 2-rank ZeRO-3 recovery step time on CPU (gloo) for both arms, from the run's own metrics.

    python bench/step_time.py [--ranks 2] [--steps 30] [--hidden 64] [--vocab-from-olmo2]

Builds a tiny OLMo2 teacher (synthetic tokenizer, or the real OLMo2 tokenizer's 100352-row vocab with
--vocab-from-olmo2 PATH), prunes it to 0.5, runs each arm under torchrun, and prints median step
time, tokens/s, peak memory (rank 0) and the job's wall time including start-up.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from distill_dist.config import TinyModelConfig
from distill_dist.demo import launch_arm
from distill_dist.models import build_tiny_model, load_tokenizer
from distill_dist.prune import prune_checkpoint
from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa

REPO = Path(__file__).resolve().parents[1]
WARMUP = 3  # first steps dropped: allocator and thread-pool warm-up


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--vocab-from-olmo2", metavar="TOKENIZER_JSON")
    a = ap.parse_args()
    if a.steps <= WARMUP:
        ap.error(f"--steps must exceed the {WARMUP} warm-up steps that are dropped")
    root = Path(tempfile.mkdtemp(prefix="dd_step_"))
    data = write_synthetic_csqa(root / "data", 2000, 50, 10)
    tok = load_tokenizer(a.vocab_from_olmo2) if a.vocab_from_olmo2 else train_tokenizer(data)
    cfg = TinyModelConfig(hidden_size=a.hidden, intermediate_size=4 * a.hidden, num_heads=4, num_kv_heads=4)
    build_tiny_model(cfg, tok).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    prune_checkpoint(root / "teacher", root / "pruned", 0.5, log=lambda *x: None)
    cfg_path = root / "cfg.yaml"
    cfg_path.write_text(
        f"model: {{path: {root / 'teacher'}}}\ndata: {{path: {data}, max_length: 128}}\n"
        f"train: {{student: {root / 'pruned'}, max_steps: {a.steps}, micro_batch_size: {a.micro_batch}, "
        f"save_every: 0, eval_after: false, ds_config: {REPO / 'ds_configs/student_zero3.json'}, "
        f"teacher_ds_config: {REPO / 'ds_configs/teacher_zero3_inference.json'}}}\n")
    print(f"tiny OLMo2 hidden {a.hidden}, vocab {len(tok)}; {a.ranks} ranks x micro-batch {a.micro_batch}; "
          f"{a.steps} steps")
    print("| arm | median step (s) | tokens/s | peak RSS rank 0 (GB) | job wall incl. start-up (s) |")
    print("|---|---|---|---|---|")
    for arm in ("ce", "kl"):
        t = time.time()
        launch_arm(cfg_path, arm, a.ranks, quiet=True)
        wall = time.time() - t
        m = [json.loads(l) for l in (root / arm / "metrics.jsonl").read_text().splitlines()][WARMUP:]
        print(f"| {arm} | {statistics.median(x['step_time_s'] for x in m):.3f} | "
              f"{statistics.median(x['tokens_per_s'] for x in m):.0f} | "
              f"{max(x['peak_memory_bytes'] for x in m) / 1e9:.2f} | {wall:.1f} |")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
