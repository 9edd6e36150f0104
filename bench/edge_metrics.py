"""Benchmark: the edge-deployment view of pruning: parameters, bytes, CPU latency and tokens/s.

    python bench/edge_metrics.py                                   # random 8-layer OLMo2, keep 0.5
    python bench/edge_metrics.py --model DIR --pruned DIR          # your own pair of checkpoints

Latency is the median over --repeats of a batch-1 forward over a CommonsenseQA-length prompt
(prefill); tokens/s is greedy decoding of --new-tokens tokens with the KV cache.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from distill_dist.config import TinyModelConfig
from distill_dist.fileio import dir_bytes
from distill_dist.models import build_tiny_model, load_causal_lm
from distill_dist.prune import prune_checkpoint


class _VocabOnly:
    """Just enough of a tokenizer for build_tiny_model: a vocabulary size and special ids."""

    def __init__(self, n: int):
        self.n, self.pad_token_id, self.eos_token_id, self.bos_token_id = n, n - 1, n - 2, None

    def __len__(self) -> int:
        return self.n


@torch.no_grad()
def measure(path: Path, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    model = load_causal_lm(str(path))
    ids = torch.randint(0, model.config.vocab_size - 100, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    model(ids)  # warm-up
    lat = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(ids)
        lat.append(time.perf_counter() - t)
    t = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=model.config.pad_token_id)
    dt = time.perf_counter() - t
    return {"params": sum(p.numel() for p in model.parameters()), "bytes": dir_bytes(path),
            "prefill_ms": 1e3 * statistics.median(lat), "decode_tok_s": (out.shape[1] - prompt_len) / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--pruned")
    ap.add_argument("--keep", type=float, default=0.5)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=100352)
    ap.add_argument("--prompt-len", type=int, default=80, help="a CSQA prompt is ~60-90 OLMo2 tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="dd_edge_"))
    model_dir = Path(args.model) if args.model else tmp / "model"
    if not args.model:
        cfg = TinyModelConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_layers=args.layers,
                              num_heads=8, num_kv_heads=8, vocab_size=args.vocab)
        build_tiny_model(cfg, _VocabOnly(args.vocab)).save_pretrained(model_dir)
    pruned_dir = Path(args.pruned) if args.pruned else tmp / "pruned"
    if not args.pruned:
        prune_checkpoint(model_dir, pruned_dir, args.keep, log=lambda *_: None)
    rows = [("unpruned", measure(model_dir, args.prompt_len, args.new_tokens, args.repeats)),
            (f"pruned (keep {args.keep})" if not args.pruned else "pruned",
             measure(pruned_dir, args.prompt_len, args.new_tokens, args.repeats))]
    base = rows[0][1]
    print(f"CPU threads={args.threads}, prompt {args.prompt_len} tokens, decode {args.new_tokens} tokens")
    print("| model | params | MB on disk | prefill ms | decode tok/s |")
    print("|---|---|---|---|---|")
    for name, m in rows:
        print(f"| {name} | {m['params']:,} ({m['params'] / base['params']:.1%}) | {m['bytes'] / 1e6:.1f} | "
              f"{m['prefill_ms']:.1f} | {m['decode_tok_s']:.1f} |")


if __name__ == "__main__":
    main()
