"""Rehearsal at OLMo2-7B widths on CPU: the whole pipeline through the CLI, measured against plan.py.

    python bench/rehearse_7b_wide.py [--layers 2] [--dir /tmp/dd_rehearse] [--stages write,fingerprint,...]

An OLMo2 with OLMo2-7B's widths (hidden 4096, MLP 11008, 32 heads, vocab 100352) and few layers, random
bf16 weights, the real OLMo2 tokenizer and a CSQA subset (written under --dir, never into the repo). Stages
run as subprocesses of the CLI (`torchrun --nproc_per_node 2` for the sharded ones); for each it prints
wall time, every rank's peak RSS (VmHWM from /proc, polled) and plan.py's prediction for the same shapes
plus the measured import baseline of one process, with the ratio. A stage whose prediction exceeds the
memory this machine has free is skipped with the figures (--force runs it anyway: it may OOM).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from prune_7b import SHAPE, write_checkpoint  # noqa: E402

from distill_dist.config import load_config  # noqa: E402
from distill_dist.plan import DTYPE_BYTES, Hardware, ModelShape, per_gpu_memory, student_shape  # noqa: E402

SHARED = REPO.parent / "shared" / "data"
VENV_BIN = REPO / ".venv" / "bin"
STAGES = ("write", "fingerprint_cheap", "fingerprint_full", "prune", "cache", "train_kl_cache", "train_kl_live",
          "train_ce", "eval")
BASELINE = "import torch, deepspeed, transformers, distill_dist.cli; print(open('/proc/self/status').read())"


def run_measured(cmd: list[str], env: dict, log: Path) -> tuple[float, int, dict]:
    """Run cmd, polling every python process under it for VmHWM (peak RSS, kB); returns wall, rc, peaks."""
    t0 = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        peaks: dict[int, int] = {}
        while proc.poll() is None:
            for pid in _descendants(proc.pid) + [proc.pid]:
                hwm = _vmhwm(pid)
                if hwm and "torchrun" not in _cmdline(pid):
                    peaks[pid] = max(peaks.get(pid, 0), hwm)
            time.sleep(0.3)
    return time.time() - t0, proc.returncode, peaks


def _descendants(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children").read_text().split() if (task / "children").exists() else []
        for c in map(int, children):
            kids += [c] + _descendants(c)
    return kids


def _vmhwm(pid: int) -> int | None:
    try:
        line = next(l for l in open(f"/proc/{pid}/status") if l.startswith("VmHWM:"))
        return int(line.split()[1])
    except (OSError, StopIteration):
        return None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def mem_available() -> float:
    line = next(l for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def baseline_rss(env: dict) -> float:
    """VmHWM of one process that only imports what every stage imports (interpreter + torch + DeepSpeed)."""
    out = subprocess.run([sys.executable, "-c", BASELINE], env=env, capture_output=True, text=True, check=True).stdout
    return int(next(l for l in out.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024


def write_subset(root: Path, n_train: int, n_dev: int) -> Path:
    """The first rows of the real CSQA train/dev files, in the official layout (the cache covers the split)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, n in (("train_rand_split.jsonl", n_train), ("dev_rand_split.jsonl", n_dev)):
        with open(SHARED / "commonsense_qa" / name) as f:
            (root / name).write_text("".join(next(f) for _ in range(n)))
    (root / "test_rand_split_no_answers.jsonl").write_text("")
    return root


def predictions(cfg, teacher: ModelShape, base: float) -> dict:
    """plan.py's per-rank bytes for each stage at these shapes (2 ranks, unfused AdamW: CPU), + the baseline.
    prune: the largest tensor (the bf16 embedding: prune streams tensor by tensor, and only the smaller MLP
    matrices get a sliced copy); eval: one whole student per process in model.dtype."""
    p = DTYPE_BYTES[cfg.model.dtype]
    student = student_shape(teacher, cfg.prune.keep_ratio, cfg.prune.round_to)
    lengths = {"kl": {"max_tokens": cfg.data.max_length}}
    m = per_gpu_memory(teacher, student, cfg, lengths, Hardware(gpus_per_node=2, fused_adam=False), p)
    return {"prune": base + 2 * teacher.largest_module(),
            "cache": base + m["teacher_shard"] + m["teacher_gathered"],
            "train_kl_cache": base + m["total_cache"], "train_ce": base + m["total_cache"],
            "train_kl_live": base + m["total_live"], "eval": base + p * student.params()}


def stage_commands(stage: str, w: Path, overrides: list[str], tok_file: Path) -> tuple[list[str], int]:
    """The CLI call of one stage and how many rank processes it runs."""
    torchrun = [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
                "-m", "distill_dist.cli"]
    cli = [str(VENV_BIN / "distill-dist")]
    fp = "import sys,time; from distill_dist.fileio import checkpoint_fingerprint as f; t=time.time(); " \
         "print(f(sys.argv[1], full=sys.argv[2]=='full'), time.time()-t)"
    if stage.startswith("fingerprint"):
        return [sys.executable, "-c", fp, str(w / "teacher"), stage.split("_")[1]], 1
    if stage == "prune":
        return cli + ["prune", *overrides], 1
    if stage == "cache":
        return torchrun + ["cache-teacher", *overrides], 2
    if stage == "eval":
        return cli + ["eval", *overrides, f"eval.model={w / 'run' / 'pruned'}"], 1
    arm, source = {"train_kl_cache": ("kl", "cache"), "train_kl_live": ("kl", "live"), "train_ce": ("ce", "live")}[stage]
    return torchrun + ["train", *overrides, f"train.arm={arm}", f"teacher.source={source}",
                       f"train.output_dir={w / 'run' / stage}"], 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/dd_rehearse_7b_wide")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=list(DTYPE_BYTES))
    ap.add_argument("--train-rows", type=int, default=16, help="CSQA train rows (the cache covers all of them)")
    ap.add_argument("--dev-rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--force", action="store_true", help="run stages predicted not to fit in free memory")
    args = ap.parse_args()
    w = Path(args.dir)
    tok_file = SHARED / "tokenizers" / "olmo2" / "tokenizer.json"
    overrides = [f"output_dir={w / 'run'}", f"model.path={w / 'teacher'}", f"model.tokenizer={tok_file}",
                 f"model.dtype={args.dtype}", f"data.path={write_subset(w / 'csqa', args.train_rows, args.dev_rows)}",
                 f"data.max_length={args.max_length}", "prune.round_to=64", "prune.schedule=[0.5]",
                 "prune.overwrite=true", f"prune.output_dir={w / 'run' / 'pruned'}", f"teacher.cache_dir={w / 'run' / 'cache'}",
                 "teacher.batch_size=4", "train.micro_batch_size=1", f"train.max_steps={args.steps}",
                 "train.warmup_steps=0", "train.save_every=0", "train.eval_after=false",
                 f"eval.limit={args.dev_rows}", "eval.batch_size=4", "eval.device=cpu", "eval.split=validation"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cfg = load_config(None, overrides)
    teacher = ModelShape(hidden=SHAPE["hidden"], intermediate=SHAPE["intermediate"], layers=args.layers,
                         heads=SHAPE["heads"], kv_heads=SHAPE["heads"], vocab=SHAPE["vocab"], qk_norm=True)
    base = baseline_rss(env)
    pred = predictions(cfg, teacher, base)
    print(f"{args.layers}-layer OLMo2 at 7B widths: teacher {teacher.params() / 1e9:.3f} B params, student "
          f"{student_shape(teacher, 0.5, 64).params() / 1e9:.3f} B; {args.dtype}; import baseline {base / 2**30:.2f} GiB"
          f"/process; free memory {mem_available() / 2**30:.1f} GiB")
    rows = [run_stage(s, w, overrides, tok_file, env, pred, args) for s in args.stages.split(",")]
    print("\n| stage | wall s | peak RSS per rank (GiB) | plan per rank (GiB) | measured/plan | note |\n|---|---|---|---|---|---|")
    print("\n".join(rows))


def run_stage(stage: str, w: Path, overrides: list[str], tok_file: Path, env: dict, pred: dict, args) -> str:
    if stage == "write":
        if (w / "teacher" / "config.json").is_file():
            return "| write | — | — | — | — | reused existing teacher |"
        t0 = time.time()
        nbytes = write_checkpoint(w / "teacher", args.layers)
        from distill_dist.models import load_tokenizer

        load_tokenizer(str(tok_file)).save_pretrained(w / "teacher")
        return f"| write | {time.time() - t0:.1f} | — | — | — | {nbytes / 1e9:.2f} GB random bf16 |"
    cmd, ranks = stage_commands(stage, w, overrides, tok_file)
    want = pred.get(stage)
    if want is not None and ranks * want > 0.9 * mem_available() and not args.force:
        return (f"| {stage} | skipped | — | {want / 2**30:.2f} | — | needs {ranks} x {want / 2**30:.1f} GiB > 90% of "
                f"{mem_available() / 2**30:.1f} GiB free |")
    log = w / f"{stage}.log"
    wall, rc, peaks = run_measured(cmd, env, log)
    ranks_rss = sorted(peaks.values(), reverse=True)[:ranks]
    rss = ", ".join(f"{kb / 2**20:.2f}" for kb in ranks_rss)
    note = f"exit {rc}, log {log}" if rc else ""
    if stage.startswith("fingerprint") and rc == 0:
        note = f"{log.read_text().split()[-1][:6]} s in-process"
    if want is None:
        return f"| {stage} | {wall:.1f} | {rss} | — | — | {note} |"
    ratio = max(ranks_rss) * 1024 / want if ranks_rss else float("nan")
    return f"| {stage} | {wall:.1f} | {rss} | {want / 2**30:.2f} | {ratio:.2f} | {note} |"


if __name__ == "__main__":
    main()
