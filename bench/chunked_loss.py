"""Benchmark: naive vs chunked KL loss at the OLMo2 vocabulary (100352): peak memory and time.

    python bench/chunked_loss.py [--positions 2048] [--hidden 1024] [--chunk 1024]

Each variant runs forward + backward in its own process (peak RSS = VmHWM of that process); on a GPU
it reports torch.cuda.max_memory_allocated instead. Naive forms [positions, V] float32 logits for
student and teacher at once; chunked forms [chunk, V] at a time and recomputes chunks in backward.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time, torch
from distill_dist.losses import LossSpec, chunked_loss, naive_loss
mode, n, h, v, chunk = sys.argv[1], *map(int, sys.argv[2:6])
dev = "cuda" if torch.cuda.is_available() else "cpu"
torch.set_num_threads(2)
g = torch.Generator(device=dev).manual_seed(0)
hs = torch.randn(n, h, device=dev, generator=g).requires_grad_(True)
ht = torch.randn(n, h, device=dev, generator=g)
ws = (torch.randn(v, h, device=dev, generator=g) * 0.02).requires_grad_(True)
wt = torch.randn(v, h, device=dev, generator=g) * 0.02
def hwm():
    if dev == "cuda":
        return torch.cuda.max_memory_allocated()
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
base = hwm()
if dev == "cuda":
    torch.cuda.reset_peak_memory_stats()
t = time.perf_counter()
spec = LossSpec("kl", temperature=2.0)
if mode == "naive":
    loss = naive_loss(hs @ ws.T, ht @ wt.T, None, spec)
else:
    loss = chunked_loss(hs, lambda x: x @ ws.T, spec, None, ht, lambda x: x @ wt.T, chunk_size=chunk)
loss.backward()
if dev == "cuda":
    torch.cuda.synchronize()
dt = time.perf_counter() - t
print(json.dumps({"loss": loss.item(), "time_s": dt, "peak_bytes": hwm(), "before_bytes": base, "device": dev}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--positions", type=int, default=2048, help="supervised positions per micro-batch")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=100352)
    ap.add_argument("--chunk", type=int, default=1024)
    a = ap.parse_args()
    res = {}
    for mode in ("naive", "chunked"):
        out = subprocess.run([sys.executable, "-c", CHILD, mode, str(a.positions), str(a.hidden), str(a.vocab),
                              str(a.chunk)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    logits_gb = a.positions * a.vocab * 4 / 1e9
    print(f"KL loss, {a.positions} positions x vocab {a.vocab}, hidden {a.hidden}, chunk {a.chunk}, "
          f"device {res['naive']['device']}; one fp32 logits tensor = {logits_gb:.2f} GB")
    print("| variant | loss | time fwd+bwd (s) | peak memory (GB) | above inputs (GB) |")
    print("|---|---|---|---|---|")
    for mode, r in res.items():
        print(f"| {mode} | {r['loss']:.6f} | {r['time_s']:.2f} | {r['peak_bytes'] / 1e9:.2f} | "
              f"{(r['peak_bytes'] - r['before_bytes']) / 1e9:.2f} |")


if __name__ == "__main__":
    main()
