"""Benchmark: what pruning buys on the edge device, in llama.cpp: unpruned vs pruned at each GGUF type.

    python bench/edge_metrics.py                                   # random 8-layer OLMo2 (OLMo2 vocabulary), keep 0.5
    python bench/edge_metrics.py --model DIR --pruned DIR          # your own pair of checkpoints

Each checkpoint is exported with `distill-dist export` (llama.cpp's converter and quantizer) and each file is
loaded in a fresh process (python -m distill_dist.llamacpp) that measures load time, peak RSS, prompt
processing (one batch of 128 tokens) and generation (32 greedy tokens, one decode each) at --threads (default 1:
on a shared 2-core machine, 2 threads gives noise, 1 is steady). Generation on a CPU is memory-bound: every
token reads every weight once (the token embedding only one row, unless it doubles as the output matrix), so
tok/s cannot beat the memory bandwidth (measured here, one thread, numpy copy) divided by those bytes; the
table shows that limit and how close llama.cpp gets, and the pruned/unpruned speed ratio against the bytes ratio.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from distill_dist.config import TinyModelConfig
from distill_dist.export import bytes_per_token, export, gguf_name
from distill_dist.llamacpp import PP_TOKENS, TG_TOKENS, run_isolated
from distill_dist.models import build_tiny_model, load_tokenizer
from distill_dist.prune import prune_checkpoint

SHARED_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "olmo2" / "tokenizer.json"


def memory_bandwidth(mb: int = 256, repeats: int = 5) -> float:
    """Bytes/s of one thread copying a large array (read + write), best of `repeats`."""
    a = np.ones(mb * 2**20 // 8)
    b = np.empty_like(a)
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(path: Path, threads: int) -> dict:
    ids = np.random.default_rng(0).integers(100, 1000, PP_TOKENS).tolist()
    job = {"model": str(path), "n_ctx": 256, "f32_kv": False, "threads": [threads],
           "requests": [{"ids": ids, "positions": [len(ids) - 1], "targets": [[0]]}]}
    edge = run_isolated(job)["edge"]
    return {"bytes": path.stat().st_size, "bytes_per_token": bytes_per_token(path), **edge["speed"][0],
            "peak_rss": edge["peak_rss_bytes"], "load_s": edge["load_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="unpruned checkpoint dir (default: a random OLMo2 built here)")
    ap.add_argument("--pruned", help="its pruned checkpoint dir (default: pruned here to --keep)")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokenizer", default=str(SHARED_TOKENIZER), help="for the random model (default: OLMo2's)")
    ap.add_argument("--types", default="f16,q8_0,q4_k_m")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="dd_edge_"))
    model_dir = Path(args.model) if args.model else tmp / "model"
    if not args.model:
        tok = load_tokenizer(args.tokenizer)
        cfg = TinyModelConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                              num_heads=8, num_kv_heads=8)
        build_tiny_model(cfg, tok).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    pruned_dir = Path(args.pruned) if args.pruned else tmp / "pruned"
    if not args.pruned:
        prune_checkpoint(model_dir, pruned_dir, args.keep, log=lambda *_: None)
    types = args.types.split(",")
    bw = memory_bandwidth()
    rows = []
    for name, ckpt in (("unpruned", model_dir), (f"pruned (keep {args.keep})" if not args.pruned else "pruned", pruned_dir)):
        export(ckpt, tmp / "gguf" / ckpt.name, types, log=lambda *_: None)
        rows += [(name, t, measure(tmp / "gguf" / ckpt.name / gguf_name(t), args.threads)) for t in types]
    print(f"llama.cpp, {args.threads} thread(s); prompt {PP_TOKENS} tokens in one batch, generation {TG_TOKENS} tokens; "
          f"memory bandwidth (1 thread, numpy copy) {bw / 1e9:.1f} GB/s")
    print("| model | type | file MB | MB read/token | peak RSS MB | load s | prompt tok/s | generation tok/s | "
          "memory-bound limit tok/s | of limit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, t, m in rows:
        limit = bw / m["bytes_per_token"]
        print(f"| {name} | {t} | {m['bytes'] / 1e6:.1f} | {m['bytes_per_token'] / 1e6:.1f} | {m['peak_rss'] / 1e6:.0f} | "
              f"{m['load_s']:.2f} | {m['prompt_tok_s']:,.0f} | {m['gen_tok_s']:,.0f} | {limit:,.0f} | "
              f"{m['gen_tok_s'] / limit:.0%} |")
    by = {(n, t): m for n, t, m in rows}
    unpruned, pruned = rows[0][0], rows[-1][0]
    for t in types:
        a, b = by[(unpruned, t)], by[(pruned, t)]
        print(f"{t}: pruned/unpruned generation tok/s {b['gen_tok_s'] / a['gen_tok_s']:.2f}x, bytes read per token "
              f"{a['bytes_per_token'] / b['bytes_per_token']:.2f}x fewer, file {b['bytes'] / a['bytes']:.0%} of unpruned")


if __name__ == "__main__":
    main()
