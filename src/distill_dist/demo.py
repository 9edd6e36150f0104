"""The CPU demo, end to end: the real pipeline on a task small enough to learn in a minute.

synthetic CSQA-format data -> tokenizer -> tiny OLMo2 teacher trained on it -> prune to each keep ratio ->
evaluate teacher and pruned models -> recover with the CE and the KL arm -> the headline
models exported to llama.cpp GGUF and scored in llama.cpp -> report. The real run is the
same commands with configs/olmo2_7b_csqa.yaml.

The runs fill the report's groups, (keep ratio, training examples), on a grid, so that its plots show
curves, not points:
- the headline group (`prune.schedule`'s ratio, the whole training split) runs each arm with
  `demo.seeds` seeds, each a real `demo.ranks`-rank ZeRO-3 job launched with torchrun, so its KL − CE
  interval covers training noise too;
- with `demo.lora`, seed 0 of each arm again with LoRA adapters (train.adapter=lora): the report's LoRA
  group on the same questions, and its GGUF rows;
- every other cell of (that ratio + `demo.curve_keep_ratios`) x (the whole split +
  `demo.curve_train_examples`) runs seed 0 of each arm as a 1-rank job of the same code path with
  `grad_accum` x `demo.ranks` (the same global batch, hence the same schedule as the headline), `demo.ranks`
  jobs side by side to keep every core busy: one seed and one rank are enough for a point on a curve,
  and the multi-rank path is exercised by the headline runs already.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup
from transformers.utils import logging as hf_logging

from .config import RunConfig, to_yaml
from .data import build_train_examples, collate, load_split, pad_token_id
from .engines import StudentWithLoss
from .errors import UserError
from .fileio import atomic_write_text
from .losses import LossSpec
from .models import build_tiny_model
from .progress import progress_bar
from .runtime import free_port
from .synthetic import train_tokenizer, write_synthetic_csqa

MARKER = ".distill_dist_demo"
ARMS = ("ce", "kl")
# Each rank one thread (2 ranks on 2 cores); transformers' per-load bars would bury the phases' own.
JOB_ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@dataclass(frozen=True)
class Run:
    """One recovery run: an arm and a seed in a (keep ratio, training examples) group."""
    arm: str
    seed: int
    keep_ratio: float
    train_examples: int | None  # None: the whole training split
    ranks: int
    grad_accum: int
    output_dir: Path  # <root>/keep<r>/n<n>/<arm>_s<seed>, slurm/reproduce.sh's layout (<arm>_lora_s<seed> for LoRA)
    lora_lr: float | None = None  # a LoRA run (train.adapter=lora) at this learning rate; None: full recovery


def keep_ratios(cfg: RunConfig) -> list[float]:
    return [cfg.prune.keep_ratio, *cfg.demo.curve_keep_ratios]


def plan_runs(cfg: RunConfig, root: Path) -> tuple[list[Run], list[Run]]:
    """(headline runs, curve runs): the headline group with every seed, the rest of the grid with seed 0."""
    d, accum = cfg.demo, cfg.train.grad_accum

    def run(arm: str, seed: int, keep_ratio: float, n: int | None, ranks: int) -> Run:
        out = root / f"keep{keep_ratio}" / f"n{n or d.train_examples}" / f"{arm}_s{seed}"
        return Run(arm, seed, keep_ratio, n, ranks, accum * d.ranks // ranks, out)

    headline = [run(arm, seed, cfg.prune.keep_ratio, None, d.ranks) for seed in range(d.seeds) for arm in ARMS]
    if d.lora:  # demo.lora: one LoRA seed per arm in the headline group, the report's LoRA group
        headline += [replace(r, output_dir=r.output_dir.with_name(f"{r.arm}_lora_s0"), lora_lr=d.lora_lr)
                     for r in headline[:len(ARMS)]]
    cells = itertools.product(keep_ratios(cfg), [None, *d.curve_train_examples])
    curves = [run(arm, 0, r, n, 1) for r, n in cells if (r, n) != (cfg.prune.keep_ratio, None) for arm in ARMS]
    return headline, curves


def pruned_dir(root: Path, keep_ratio: float) -> Path:
    return root / f"keep{keep_ratio}" / "pruned"


def pruned_eval_dir(root: Path, keep_ratio: float) -> Path:
    return root / "eval" / f"pruned_keep{keep_ratio}"


def train_teacher(model, tok, cfg: RunConfig) -> None:
    """Plain single-process CE training of the teacher on the synthetic task (answer-letter loss)."""
    d = cfg.demo
    examples = build_train_examples(tok, load_split(cfg.data, "train"), "ce", "answer", cfg.data.max_length)
    net = StudentWithLoss(model, LossSpec("ce"), cfg.train.chunk_size).train()
    opt = torch.optim.AdamW(net.parameters(), lr=d.teacher_lr, betas=(0.9, 0.95))
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, d.teacher_steps // 20, d.teacher_steps, min_lr_rate=0.05)
    gen = torch.Generator().manual_seed(d.seed)
    with progress_bar(range(d.teacher_steps), desc="teacher training", unit="step") as bar:
        for step in bar:
            idx = torch.randint(0, len(examples), (d.teacher_batch,), generator=gen).tolist()
            loss = net(**collate([examples[i] for i in idx], pad_token_id(tok), "cpu"))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def arm_command(cfg_path: Path, run: Run) -> list[str]:
    """One run as a user would launch it: a torchrun job (gloo on CPU). (A plain process would inherit
    the world of one that this process's evaluations joined, its port included.)"""
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(run.ranks), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port())]
    overrides = [f"train.arm={run.arm}", f"train.seed={run.seed}", f"train.grad_accum={run.grad_accum}",
                 f"prune.schedule=[{run.keep_ratio}]", f"prune.output_dir={pruned_dir(cfg_path.parent, run.keep_ratio)}",
                 f"train.output_dir={run.output_dir}"]
    if run.train_examples is not None:
        overrides.append(f"data.train_examples={run.train_examples}")
    if run.lora_lr is not None:
        overrides += ["train.adapter=lora", f"train.lr={run.lora_lr}"]
    return [sys.executable, *launcher, "-m", "distill_dist.cli", "train", "--config", str(cfg_path), *overrides]


def _failed(run: Run, code: int, detail: str = "") -> UserError:
    return UserError(f"the {run.arm.upper()} arm's job (keep {run.keep_ratio}, seed {run.seed}) failed with exit "
                     f"code {code}{detail}")


def launch_headline(cfg_path: Path, run: Run) -> None:
    """One headline run in the foreground: its command, then the recipe's own progress bar."""
    cmd = arm_command(cfg_path, run)
    print(f"$ {' '.join(cmd[2:])}", flush=True)
    code = subprocess.run(cmd, env=os.environ | JOB_ENV).returncode
    if code:
        raise _failed(run, code)


def launch_side_by_side(cfg_path: Path, runs: list[Run], width: int, steps: int) -> None:
    """The curve runs, `width` at a time, each one's output in <run dir>.log; one bar counts their steps
    (the lines of their metrics.jsonl)."""
    pending, active, finished = list(runs), [], 0
    with progress_bar(total=steps * len(runs), desc=f"curve runs ({len(runs)}, {width} at a time)", unit="step") as bar:
        while pending or active:
            while pending and len(active) < width:
                run = pending.pop(0)
                run.output_dir.parent.mkdir(parents=True, exist_ok=True)
                with open(run.output_dir.with_suffix(".log"), "w") as log:
                    proc = subprocess.Popen(arm_command(cfg_path, run), stdout=log, stderr=subprocess.STDOUT,
                                            env=os.environ | JOB_ENV)
                active.append((run, proc))
            time.sleep(0.5)
            for run, proc in [a for a in active if a[1].poll() is not None]:
                active.remove((run, proc))
                finished += 1
                if proc.returncode:
                    for _, other in active:
                        other.kill()
                    raise _failed(run, proc.returncode, f"; its output: {run.output_dir.with_suffix('.log')}")
            bar.update(finished * steps + sum(_steps_logged(run.output_dir) for run, _ in active) - bar.n)


def _steps_logged(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_bytes().count(b"\n") if path.is_file() else 0


@contextmanager
def one_thread():
    """This process's phases on one thread, like each rank of the jobs: the figures then do not depend on
    the machine's core count (the summation order does), and when the cores are busy an OpenMP team
    waiting on a descheduled thread made teacher steps 30x slower (68 ms -> 2.2 s at load 7 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def demo_ranks(asked: int, gpus: int | None = None) -> int:
    """Ranks per arm: on a machine with fewer GPUs than demo.ranks, one rank per GPU (two ranks mapped to
    one cuda:0 are refused by NCCL); on CPU (gloo) as asked."""
    gpus = torch.cuda.device_count() if gpus is None else gpus
    if 0 < gpus < asked:
        print(f"demo: {gpus} GPU(s) for demo.ranks={asked}: running {gpus} rank(s) per arm")
        return gpus
    return asked


def run_demo(cfg: RunConfig, prune_fn, eval_fn, export_fn) -> str:
    from .export import converter_dir

    converter_dir()  # the edge stage needs llama.cpp: say so now, not after the training
    with one_thread():
        return _run_demo(cfg, prune_fn, eval_fn, export_fn)


def edge_stage(cfg: RunConfig, root: Path, models: dict[str, Path], export_fn, eval_fn) -> Path:
    """Each model exported to GGUF at export.types and each file scored inside llama.cpp: root/edge/<model>/."""
    from .export import gguf_name

    for name, ckpt in models.items():
        out = root / "edge" / name
        export_fn(replace(cfg, export=replace(cfg.export, model=str(ckpt), output_dir=str(out))))
        for t in cfg.export.types:
            eval_fn(replace(cfg, eval=replace(cfg.eval, backend="llamacpp", model=str(out / gguf_name(t)),
                                              output_dir=str(out / f"eval-{t}"))))
    return root / "edge"


def _run_demo(cfg: RunConfig, prune_fn, eval_fn, export_fn) -> str:
    from .report import make_report

    root = Path(cfg.output_dir)
    if root.exists():
        if not (root / MARKER).is_file():
            raise UserError(f"{root} exists and is not a demo dir; choose another output_dir")
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / MARKER).touch()
    t0 = time.time()

    hf_logging.disable_progress_bar()
    cfg = replace(cfg, demo=replace(cfg.demo, ranks=demo_ranks(cfg.demo.ranks)))
    d = cfg.demo
    data_dir = write_synthetic_csqa(root / "data", d.train_examples, d.eval_examples, 100, d.seed)
    tok = train_tokenizer(data_dir)
    cfg = replace(cfg, data=replace(cfg.data, source="jsonl", path=str(data_dir)),
                  model=replace(cfg.model, path=str(root / "teacher"), tokenizer=None),
                  prune=replace(cfg.prune, output_dir=str(pruned_dir(root, cfg.prune.keep_ratio))))
    teacher = build_tiny_model(cfg.tiny, tok)
    train_teacher(teacher, tok, cfg)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    eval_fn(replace(cfg, eval=replace(cfg.eval, model=str(root / "teacher"), output_dir=str(root / "eval" / "teacher"))))
    for r in keep_ratios(cfg):
        pcfg = replace(cfg, prune=replace(cfg.prune, schedule=[r], output_dir=str(pruned_dir(root, r))))
        prune_fn(pcfg)
        eval_fn(replace(pcfg, eval=replace(cfg.eval, model=str(pruned_dir(root, r)),
                                           output_dir=str(pruned_eval_dir(root, r)))))

    cfg_path = root / "demo_config.yaml"
    atomic_write_text(cfg_path, to_yaml(cfg))
    headline, curves = plan_runs(cfg, root)
    for run in headline:
        launch_headline(cfg_path, run)
    launch_side_by_side(cfg_path, curves, d.ranks, cfg.train.max_steps)
    # The edge stage for the headline group (the teacher, its pruned model, every headline run): what the
    # report's edge table pairs, KL - CE at each type and each type - f16.
    models = {"teacher": root / "teacher", "pruned": Path(cfg.prune.output_dir),
              **{run.output_dir.name: run.output_dir / "final" for run in headline}}
    edge = edge_stage(cfg, root, models, export_fn, eval_fn)
    md, _ = make_report([str(run.output_dir) for run in headline + curves], root / "report",
                        str(root / "eval" / "teacher"), [str(pruned_eval_dir(root, r)) for r in keep_ratios(cfg)],
                        [str(edge)])
    print()
    print(md)
    print(f"demo done in {time.time() - t0:.0f}s; report, CSV and plots in {root / 'report'}")
    return md
