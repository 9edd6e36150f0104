"""Recovery recipe: re-train the pruned student with the CE arm (labels) or the KL arm (teacher only).

Read top to bottom: setup (data, models under DeepSpeed ZeRO-3, resume), the training loop, then
save / export / evaluate. The student is a ZeRO-3 training engine; the frozen unpruned teacher a
ZeRO-3 inference engine (no optimizer, no grads). Both are loaded under `HfDeepSpeedConfig`, so
`from_pretrained` partitions each parameter as it is created and no rank ever holds a whole model.
With `train.deepspeed=false` the same loop runs in one process with plain torch: the reference the
sharded run is tested against.

A batch goes: row indices (a pure function of seed and step) -> token ids -> student hidden states at
the supervised positions -> chunked loss through the LM head (teacher hidden states at the same
positions for the KL arm) -> backward -> optimizer step. Because the data position is the step
number and every state (weights, Adam moments, LR schedule, RNG) is checkpointed, an interrupted and
resumed run reproduces the uninterrupted loss curve exactly.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import hjson
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from .config import RunConfig, to_yaml
from .data import PROMPT_VERSION, build_train_examples, collate, load_split
from .errors import CheckpointError, ConfigError, UserError
from .fileio import atomic_write_json, atomic_write_text, checkpoint_fingerprint, replace_dir
from .losses import LossSpec, chunked_loss
from .models import load_tokenizer
from .prune import PLAN_FILE, load_plan, read_model_config

EXIT_PREEMPTED = 75  # "try again": the Slurm wrapper requeues on it
DONE_FILE = "done.json"
LATEST_FILE = "latest_complete"


class Preempted(Exception):
    """A stop signal arrived; a checkpoint was written and the job should be requeued."""


STOP_REQUESTED = {"flag": False}


def install_stop_handlers() -> None:
    """SIGUSR1 (Slurm's preemption notice) and SIGTERM only set a flag; the loop checkpoints at the end of
    the current step. Installed first thing in the CLI, so a notice during start-up is not lost."""
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: STOP_REQUESTED.__setitem__("flag", True))


class TrainingDiverged(UserError):
    exit_code = 3


# ---------------------------------------------------------------- modules the engines wrap

class StudentWithLoss(torch.nn.Module):
    """Forward = recovery loss, so the DeepSpeed engine's forward/backward cover the whole step."""

    def __init__(self, lm, spec: LossSpec, chunk_size: int):
        super().__init__()
        self.lm, self.spec, self.chunk_size = lm, spec, chunk_size

    def forward(self, input_ids, attention_mask, rows, cols, labels=None, teacher_hidden=None, teacher_head=None,
                teacher_cache=None):
        hidden = self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return chunked_loss(hidden[rows, cols], self.lm.lm_head, self.spec, labels, teacher_hidden, teacher_head,
                            self.chunk_size, teacher_cache)


class TeacherHidden(torch.nn.Module):
    """The teacher's final hidden states at the supervised positions only (its LM head runs per chunk)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, rows, cols, **_):
        return self.lm.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[rows, cols]


# ---------------------------------------------------------------- pure helpers

def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def global_batch(n_examples: int, step: int, size: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`: a fresh seeded permutation per epoch, last partial batch dropped."""
    per_epoch = n_examples // size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * size: (k + 1) * size].tolist()


def micro_slice(batch: list[int], micro: int, rank: int, world_size: int, micro_bs: int) -> list[int]:
    """Micro-batch `micro` of `rank`: slot micro*world + rank, so (world 2, accum 1) == (world 1, accum 2)."""
    slot = micro * world_size + rank
    return batch[slot * micro_bs: (slot + 1) * micro_bs]


def build_ds_config(path: str, cfg: RunConfig, device: torch.device, training: bool) -> dict:
    """Load a DeepSpeed JSON (comments allowed), fill its "auto" values from the run config."""
    repo_default = Path(__file__).resolve().parents[2] / path  # the repo's ds_configs/, from any cwd
    if not Path(path).is_file() and not Path(path).is_absolute() and repo_default.is_file():
        path = str(repo_default)
    if not Path(path).is_file():
        raise ConfigError(f"config field 'train.{'ds_config' if training else 'teacher_ds_config'}': "
                          f"no such file '{path}'")
    ds = json.loads(json.dumps(hjson.load(open(path))))
    tr = cfg.train
    bf16 = device.type == "cuda"  # bf16 on GPUs, fp32 on CPU
    auto = {"train_micro_batch_size_per_gpu": tr.micro_batch_size, "gradient_accumulation_steps": tr.grad_accum,
            "gradient_clipping": tr.grad_clip}
    for key, value in auto.items():
        if ds.get(key) == "auto":
            ds[key] = value
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = bf16
    for dotted, value in tr.ds_overrides.items():
        node = ds
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    leftover = [k for k, v in _walk(ds) if v == "auto"]
    if leftover:
        raise ConfigError(f"{path}: no run-config value fills 'auto' at {', '.join(leftover)}")
    return ds


def _walk(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _peak_memory_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _all_reduce(value: float, op=None) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return float(t.item())
    return value


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def init_process_group(use_deepspeed: bool) -> tuple[int, int, int]:
    """Join the launcher's process group (torchrun / srun / deepspeed); single process needs no launcher."""
    from .distributed import free_port, maybe_init_distributed

    if not use_deepspeed:
        return maybe_init_distributed()
    import deepspeed

    if "WORLD_SIZE" not in os.environ and "SLURM_PROCID" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "gloo":
            # On CPU, DeepSpeed JIT-compiles a shared-memory all-reduce kernel at init, under a file lock in
            # ~/.cache/torch_extensions; a rank killed while holding it leaves every later job waiting on the
            # lock forever (seen under Slurm). gloo does the same collectives; skip the kernel.
            import importlib

            # (importlib: `import deepspeed.comm.torch as m` binds the torch package deepspeed.comm re-exports)
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def load_frozen_teacher(cfg: RunConfig, teacher_dir: str, device: torch.device, use_deepspeed: bool | None = None):
    """The unpruned model, frozen: a ZeRO-3 inference engine (no optimizer, no grads) under DeepSpeed,
    else a plain module. Either returns final hidden states at the supervised positions."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not (cfg.train.deepspeed if use_deepspeed is None else use_deepspeed):
        from .models import load_causal_lm

        plain_dtype = "bfloat16" if device.type == "cuda" else "float32"
        return TeacherHidden(load_causal_lm(teacher_dir, plain_dtype, device).requires_grad_(False)).eval()
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    ds_teacher = build_ds_config(cfg.train.teacher_ds_config, cfg, device, training=False)
    keep_alive = HfDeepSpeedConfig(ds_teacher)  # noqa: F841 (from_pretrained reads it through a weak ref)
    teacher_lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype).eval().requires_grad_(False)
    engine = deepspeed.initialize(model=TeacherHidden(teacher_lm), config=ds_teacher)[0]
    engine.eval()
    unset_hf_deepspeed_config()
    return engine


# ---------------------------------------------------------------- the recipe

def run_training(cfg: RunConfig) -> dict | None:
    tr = cfg.train
    run_dir = Path(tr.output_dir)
    if (run_dir / DONE_FILE).is_file():
        print(f"{run_dir} is complete ({DONE_FILE} exists); nothing to do")
        return json.loads((run_dir / DONE_FILE).read_text())

    # ---- setup: what to train, on what, against what
    student_dir = tr.student or cfg.prune.output_dir
    if not Path(student_dir).is_dir():
        raise ConfigError(f"config field 'train.student': no such directory '{student_dir}' (run `distill-dist prune` first)")
    plan = load_plan(student_dir)
    spec = LossSpec(kind=tr.loss_kind, temperature=tr.temperature, jsd_beta=tr.jsd_beta, alpha=tr.alpha)
    teacher_dir = cfg.model.path
    live_teacher = spec.needs_teacher and cfg.teacher.source == "live"
    cache = None
    s_vocab = read_model_config(Path(student_dir)).get("vocab_size")
    if spec.needs_teacher and not live_teacher:
        from .cache import TeacherCache

        cache = TeacherCache.open(cfg.teacher.cache_dir)  # checksums verified; fingerprint checked below
        if cache.vocab_size != s_vocab:
            raise ConfigError(f"teacher cache vocab_size {cache.vocab_size} != student vocab_size {s_vocab}: "
                              "distillation needs the same vocabulary")
    if live_teacher:
        if not teacher_dir or not Path(teacher_dir).is_dir():
            raise ConfigError(f"config field 'model.path': the {tr.arm.upper()} arm needs the unpruned teacher; "
                              f"no such directory '{teacher_dir}'")
        t_vocab = read_model_config(Path(teacher_dir)).get("vocab_size")
        if t_vocab != s_vocab:
            raise ConfigError(f"teacher vocab_size {t_vocab} ({teacher_dir}) != student vocab_size {s_vocab} "
                              f"({student_dir}): distillation needs the same vocabulary")

    rank, world_size, local_rank = init_process_group(tr.deepspeed)
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    random.seed(tr.seed), np.random.seed(tr.seed), torch.manual_seed(tr.seed)
    is_main = rank == 0

    teacher_fp = None
    if live_teacher and is_main:
        teacher_fp = checkpoint_fingerprint(teacher_dir)
        root_fp = plan.get("root_fingerprint", plan["source_fingerprint"])
        if teacher_fp != root_fp:
            raise ConfigError(f"model.path '{teacher_dir}' is not the checkpoint the student was pruned from "
                              f"(fingerprint {teacher_fp[:12]} vs the plan's {root_fp[:12]})")

    tok = load_tokenizer(cfg.model.tokenizer or student_dir)
    train_ds = load_split(cfg.data, "train")
    examples = build_train_examples(tok, train_ds, tr.arm, tr.positions, cfg.data.max_length, cfg.data.add_bos)
    gbs = tr.micro_batch_size * world_size * tr.grad_accum
    if len(examples) < gbs:
        raise ConfigError(f"{len(examples)} training examples < one global batch ({gbs} = micro_batch_size "
                          f"{tr.micro_batch_size} x world {world_size} x grad_accum {tr.grad_accum})")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    if cache is not None:
        from .cache import expected_fingerprint

        cache.check(expected_fingerprint(cfg, plan.get("root_fingerprint", plan["source_fingerprint"]), tok),
                    [r["id"] for r in examples])
        teacher_fp = cache.fingerprint_sha256

    meta = {
        "arm": tr.arm, "loss": vars(spec) | {"positions": tr.positions},
        "plan_sha256": plan["plan_sha256"], "keep_ratio": plan["keep_ratio"],
        "prune": {"schedule": list(cfg.prune.schedule), "mode": cfg.prune.mode, "score": plan["score"]},
        "params_before": plan["params"]["total_before"], "params_after": plan["params"]["total_after"],
        "teacher": {"source": ("live" if live_teacher else "cache") if spec.needs_teacher else "none",
                    "path": (teacher_dir if live_teacher else cfg.teacher.cache_dir) if spec.needs_teacher else None,
                    "fingerprint": teacher_fp},
        "schedule": {"max_steps": tr.max_steps, "global_batch": gbs, "lr": tr.lr, "warmup_steps": tr.warmup_steps,
                     "min_lr_ratio": tr.min_lr_ratio, "weight_decay": tr.weight_decay, "grad_clip": tr.grad_clip,
                     "seed": tr.seed, "train_examples": len(examples)},
        "data": {"source": cfg.data.source, "path": cfg.data.path, "train_examples": cfg.data.train_examples,
                 "seed": cfg.data.seed, "max_length": cfg.data.max_length, "prompt_version": PROMPT_VERSION},
        "launch": {"world_size": world_size, "micro_batch_size": tr.micro_batch_size, "grad_accum": tr.grad_accum,
                   "deepspeed": tr.deepspeed, "device": device.type},
    }

    # ---- models: student (trainable) and teacher (frozen), both ZeRO-3 sharded under DeepSpeed
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if tr.deepspeed:
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig

        ds_student = build_ds_config(tr.ds_config, cfg, device, training=True)
        keep_alive = HfDeepSpeedConfig(ds_student)  # from_pretrained now loads straight into zero.Init shards
        student = StudentWithLoss(AutoModelForCausalLM.from_pretrained(student_dir, dtype=dtype), spec, tr.chunk_size)
        optimizer = _make_optimizer(student, tr, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, tr.warmup_steps, tr.max_steps, tr.min_lr_ratio))
        engine, optimizer, _, scheduler = deepspeed.initialize(model=student, optimizer=optimizer,
                                                               lr_scheduler=scheduler, config=ds_student)
        del keep_alive
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
    else:
        if world_size > 1:
            raise ConfigError("train.deepspeed=false runs in one process only; launch without torchrun")
        from .models import load_causal_lm

        student = StudentWithLoss(load_causal_lm(student_dir, "float32", device).train(), spec, tr.chunk_size)
        optimizer = _make_optimizer(student, tr, device)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, tr.warmup_steps, tr.max_steps, tr.min_lr_ratio))
        engine = None
    teacher_engine = load_frozen_teacher(cfg, teacher_dir, device) if live_teacher else None
    student_module = engine.module if engine is not None else student
    _write_sharding_report(run_dir, rank, world_size, student_module, teacher_engine, engine)

    # ---- resume
    ckpt_root = run_dir / "checkpoints"
    start_step = _resume(engine, student, optimizer, scheduler, ckpt_root, rank)
    if is_main:
        _check_meta(run_dir, meta, resuming=start_step > 0)
        atomic_write_json(run_dir / "run_meta.json", meta)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        _truncate_metrics(run_dir / "metrics.jsonl", start_step)
    install_stop_handlers()  # no-op if the CLI did it already
    tb = _tensorboard(run_dir) if tr.tensorboard and is_main else None

    # ---- the loop
    bar = tqdm(total=tr.max_steps, initial=start_step, desc=f"{tr.arm} recovery", unit="step", disable=not is_main)
    step = start_step
    try:
        while step < tr.max_steps:
            t0 = time.time()
            lr_now = scheduler.get_last_lr()[0]  # the rate this step's update uses
            batch_rows = global_batch(len(examples), step, gbs, tr.seed)
            loss_sum, tokens = 0.0, 0
            for micro in range(tr.grad_accum):
                rows = [examples[i] for i in micro_slice(batch_rows, micro, rank, world_size, tr.micro_batch_size)]
                batch = collate(rows, pad_id, device)
                tokens += int(batch["attention_mask"].sum())
                if cache is not None:
                    batch["teacher_cache"] = cache.lookup(rows, device)
                loss_sum += _micro_step(engine, student, teacher_engine, batch, spec, tr, step, micro, ckpt_root)
                if engine is not None:
                    engine.step()  # applies the update at the accumulation boundary only
            if engine is None:
                clip = tr.grad_clip if tr.grad_clip > 0 else float("inf")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(student.parameters(), clip))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            else:
                grad_norm = engine.get_global_grad_norm()
                grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            step += 1
            mean_loss = _all_reduce(loss_sum / tr.grad_accum) / world_size
            all_tokens = _all_reduce(tokens)
            dt = time.time() - t0
            if is_main:
                record = {"step": step, "loss": mean_loss, "lr": lr_now, "grad_norm": grad_norm,
                          "tokens_per_s": all_tokens / dt, "step_time_s": dt, "peak_memory_bytes": _peak_memory_bytes(device)}
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                if tb is not None:
                    for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                        tb.add_scalar(f"train/{k}", record[k], step)
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{all_tokens / dt:.0f}")
                bar.update(1)
            preempt = _all_reduce(1.0 if STOP_REQUESTED["flag"] else 0.0) > 0
            if preempt or (tr.save_every and step % tr.save_every == 0) or step == tr.max_steps:
                _save(engine, student, optimizer, scheduler, ckpt_root, step, rank, tr.keep_checkpoints)
            if preempt and step < tr.max_steps:
                bar.close()
                if is_main:
                    print(f"stop signal: checkpoint at step {step} in {ckpt_root}; exiting with {EXIT_PREEMPTED} for requeue")
                raise Preempted()
    finally:
        bar.close()  # an error message then starts on its own line

    # ---- export the recovered student as a standard checkpoint, evaluate it, mark the run done
    final_dir = run_dir / "final"
    _export(engine, student_module, tok, student_dir, final_dir, rank)
    result = {"run_dir": str(run_dir), "final": str(final_dir), **meta}
    if tr.eval_after:
        result["eval"] = _evaluate_final(cfg, final_dir, run_dir / "eval", device)
    if is_main:
        atomic_write_json(run_dir / DONE_FILE, result)
        print(f"{tr.arm} recovery done: {run_dir}")
    _barrier()
    return result


def run_recovery(cfg: RunConfig) -> dict | None:
    """One-shot: one training run. Iterative (prune.mode=iterative, keep 0.9 -> 0.7 -> 0.5): one run per
    stage under <train.output_dir>/stageN; between stages the recovered student is exported (gathered from
    its ZeRO-3 shards), pruned further on disk, and training continues from it with a fresh optimizer
    and LR schedule of train.max_steps steps. Keep counts are relative to the original MLP size."""
    from dataclasses import replace

    from .prune import keep_count, prune_checkpoint

    tr, schedule = cfg.train, list(cfg.prune.schedule)
    if cfg.prune.mode != "iterative" or len(schedule) == 1:
        return run_training(cfg)
    run_dir = Path(tr.output_dir)
    if (run_dir / DONE_FILE).is_file():
        print(f"{run_dir} is complete ({DONE_FILE} exists); nothing to do")
        return json.loads((run_dir / DONE_FILE).read_text())
    first_student = tr.student or cfg.prune.output_dir
    plan0 = load_plan(first_student)
    if abs(plan0["keep_ratio"] - schedule[0]) > 1e-9:
        raise ConfigError(f"{first_student} was pruned to keep {plan0['keep_ratio']}, but prune.schedule starts at "
                          f"{schedule[0]}")
    original = plan0["intermediate_size_before"]
    student, result = first_student, None
    for i, ratio in enumerate(schedule):
        stage_dir = run_dir / f"stage{i}"
        if i > 0:
            student = str(stage_dir / "student")
            if not dist.is_initialized() or dist.get_rank() == 0:
                prune_checkpoint(run_dir / f"stage{i - 1}" / "final", student, ratio, plan0["score"],
                                 cfg.prune.round_to, cfg.prune.max_shard_mb,
                                 keep=keep_count(original, ratio, cfg.prune.round_to))
            _barrier()
        last = i == len(schedule) - 1
        result = run_training(replace(cfg, train=replace(tr, output_dir=str(stage_dir), student=student,
                                                         eval_after=tr.eval_after and last)))
    # The run as a whole: starts from plan0 (shared by both arms), ends at the last ratio.
    last_plan = load_plan(result["final"])
    result.update(run_dir=str(run_dir), plan_sha256=plan0["plan_sha256"], keep_ratio=schedule[-1],
                  params_after=last_plan["params"]["total_after"], params_before=plan0["params"]["total_before"],
                  stages=[str(run_dir / f"stage{i}") for i in range(len(schedule))])
    if not dist.is_initialized() or dist.get_rank() == 0:
        if (run_dir / f"stage{len(schedule) - 1}" / "eval").is_dir():
            shutil.copytree(run_dir / f"stage{len(schedule) - 1}" / "eval", run_dir / "eval", dirs_exist_ok=True)
        atomic_write_json(run_dir / DONE_FILE, result)
    _barrier()
    return result


# ---------------------------------------------------------------- steps of the recipe

def _write_sharding_report(run_dir: Path, rank: int, world_size: int, student, teacher_engine, engine) -> None:
    """Per rank: how much of each parameter this rank holds (ZeRO-3 shards), and whether the teacher has
    an optimizer. A user checking memory layout, and the tests, read it."""
    def layout(module):
        out = {}
        for name, p in module.named_parameters():
            full = getattr(p, "ds_numel", p.numel())
            local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            out[name] = [local, full]
        return out

    report = {"rank": rank, "world_size": world_size, "student": layout(student),
              "student_has_optimizer": engine is not None and engine.optimizer is not None}
    if teacher_engine is not None:
        t = _teacher_module(teacher_engine)
        report["teacher"] = layout(t)
        # Without an optimizer DeepSpeed puts only its parameter-partitioning manager (DeepSpeedZeRoOffload,
        # no optimizer state) where the optimizer would be.
        opt = getattr(teacher_engine, "optimizer", None)
        report["teacher_optimizer"] = type(opt).__name__ if opt is not None else None
        report["teacher_has_optimizer"] = opt is not None and type(opt).__name__ != "DeepSpeedZeRoOffload"
        report["teacher_requires_grad"] = any(p.requires_grad for p in t.parameters())
    atomic_write_json(run_dir / "sharding" / f"rank{rank}.json", report)


def _make_optimizer(model, tr, device):
    decay = [p for n, p in model.named_parameters() if p.requires_grad and not n.endswith(("norm.weight", "bias"))]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith(("norm.weight", "bias"))]
    groups = [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tr.lr, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")


def _micro_step(engine, student, teacher_engine, batch, spec: LossSpec, tr, step: int, micro: int,
                ckpt_root: Path) -> float:
    """Forward (teacher first, no grad; it runs on every rank every step) and backward of one micro-batch."""
    labels = batch.pop("labels", None)
    if not spec.needs_labels and labels is not None:
        raise AssertionError("the KL arm's batches must not carry labels")
    teacher_hidden, teacher_head, gather = None, None, nullcontext()
    if spec.needs_teacher and "teacher_cache" not in batch:
        with torch.no_grad():
            teacher_hidden = teacher_engine(**batch)
        head_w = _teacher_module(teacher_engine).lm.lm_head.weight
        if hasattr(head_w, "ds_id"):  # ZeRO-3: gather the teacher's head once for every chunk and its recompute
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([head_w], modifier_rank=None)
        teacher_head = lambda h: F.linear(h, head_w)  # noqa: E731
    with gather:
        model = engine if engine is not None else student
        loss = model(**batch, labels=labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head)
        if not math.isfinite(_all_reduce(loss.item(), dist.ReduceOp.MAX if dist.is_initialized() else None)):
            _abort_diverged(step, micro, ckpt_root)
        if engine is not None:
            engine.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
        else:
            (loss / tr.grad_accum).backward()
    return loss.item()


def _teacher_module(teacher_engine):
    return teacher_engine.module if hasattr(teacher_engine, "module") else teacher_engine


def _abort_diverged(step: int, micro: int, ckpt_root: Path):
    latest = ckpt_root / LATEST_FILE
    where = f"last good checkpoint: {ckpt_root / latest.read_text().strip()}" if latest.is_file() else "no checkpoint yet"
    raise TrainingDiverged(f"non-finite loss at step {step + 1} (micro-batch {micro}); stopped without applying it; "
                           f"{where}. Lower train.lr or check the data")


def _save(engine, model, optimizer, scheduler, root: Path, step: int, rank: int, keep: int) -> None:
    """Sharded checkpoint + per-rank RNG; `latest_complete` moves only after every rank has finished."""
    tag = f"step_{step:07d}"
    tag_dir = root / tag
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)
    _barrier()
    client = {"step": step}
    if engine is not None:
        engine.save_checkpoint(str(root), tag=tag, client_state=client, save_latest=False)
    else:
        tag_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), **client}, tag_dir / "state.pt.tmp")
        os.replace(tag_dir / "state.pt.tmp", tag_dir / "state.pt")
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank}.pt.tmp")
    os.replace(tag_dir / f"rng_rank{rank}.pt.tmp", tag_dir / f"rng_rank{rank}.pt")
    _barrier()
    if rank == 0:
        atomic_write_text(tag_dir / "COMPLETE", f"{step}\n")
        atomic_write_text(root / LATEST_FILE, tag + "\n")
        tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in tags[:-keep]:
            shutil.rmtree(root / old, ignore_errors=True)
    _barrier()


def _resume(engine, model, optimizer, scheduler, root: Path, rank: int) -> int:
    latest = root / LATEST_FILE
    if not latest.is_file():
        return 0
    tag = latest.read_text().strip()
    tag_dir = root / tag
    if not (tag_dir / "COMPLETE").is_file():
        raise CheckpointError(f"{latest} names {tag}, which has no COMPLETE marker (corrupt checkpoint dir)")
    rng_file = tag_dir / f"rng_rank{rank}.pt"
    if not rng_file.is_file():
        raise CheckpointError(f"{tag_dir}: no {rng_file.name}: resume with the same number of ranks "
                              "as the run that wrote it")
    if engine is not None:
        path, client = engine.load_checkpoint(str(root), tag=tag)
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        step = client["step"]
    else:
        state = torch.load(tag_dir / "state.pt", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = state["step"]
    _set_rng_state(torch.load(rng_file, weights_only=False))
    if rank == 0:
        print(f"resuming from {tag_dir} (step {step})")
    return step


def _check_meta(run_dir: Path, meta: dict, resuming: bool) -> None:
    path = run_dir / "run_meta.json"
    if not resuming or not path.is_file():
        return
    old = json.loads(path.read_text())
    for key in ("arm", "loss", "plan_sha256", "schedule", "data"):
        if old.get(key) != meta.get(key):
            raise ConfigError(f"{run_dir} holds a checkpoint of a different run ({key}: {old.get(key)} vs "
                              f"{meta.get(key)}); use another train.output_dir")


def _truncate_metrics(path: Path, start_step: int) -> None:
    """On resume, drop metric lines past the checkpoint so the curve continues without duplicates."""
    if not path.is_file():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= start_step]
    atomic_write_text(path, "".join(l + "\n" for l in keep))


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _export(engine, module, tok, student_dir: str, out: Path, rank: int) -> None:
    """Consolidate the (sharded) student into a standard HF checkpoint on rank 0; written atomically."""
    if engine is not None:
        state = engine._zero3_consolidated_16bit_state_dict()  # collective: every rank takes part
    else:
        state = module.state_dict()
    if rank == 0:
        state = {k[len("lm."):]: v.detach().cpu() for k, v in state.items() if k.startswith("lm.")}
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        module.lm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tok.save_pretrained(tmp)
        shutil.copy2(Path(student_dir) / PLAN_FILE, tmp / PLAN_FILE)
        replace_dir(tmp, out)
    _barrier()


def _evaluate_final(cfg: RunConfig, final_dir: Path, out_dir: Path, device) -> dict | None:
    """The foundation's evaluator on the exported checkpoint (plain model per rank, questions sharded)."""
    from .evaluate import evaluate, write_eval
    from .models import load_causal_lm

    tok = load_tokenizer(str(final_dir))
    ds = load_split(cfg.data, cfg.eval.split)
    if cfg.eval.limit:
        ds = ds.select(range(min(cfg.eval.limit, len(ds))))
    model = load_causal_lm(str(final_dir), "float32" if device.type == "cpu" else cfg.model.dtype, device)
    metrics, per_example = evaluate(model, tok, ds, cfg.eval.batch_size, cfg.data.max_length, device,
                                    cfg.data.add_bos, progress=False)
    if dist.is_initialized() and dist.get_rank() != 0:
        return metrics
    write_eval(out_dir, metrics, per_example, {
        "split": cfg.eval.split, "model": {"path": str(final_dir), "fingerprint": checkpoint_fingerprint(final_dir),
                                           "params": sum(p.numel() for p in model.parameters())}})
    return metrics
