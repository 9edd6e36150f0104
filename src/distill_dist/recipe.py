"""Recovery recipe: re-train the pruned student with the CE arm (labels) or the KL arm (teacher only).

Read top to bottom: `setup()` (checks, data, student engine, teacher targets, resume), `train()` (the
loop, the step in plain sight), `save()` (export, evaluate, mark done). One code path for 1 and N ranks.

A batch goes: row indices (a pure function of seed and step) -> token ids (`data.collate`) -> the
teacher's targets for the supervised positions (live ZeRO-3 teacher or disk cache, one interface) ->
student hidden states at those positions -> the fused loss through the LM head, once per micro-step on
every rank -> backward -> optimizer step. The data position is the step number and every state is
checkpointed, so an interrupted and resumed run follows the uninterrupted loss curve. On CPU it repeats
it bit for bit (on the same machine and software). On CUDA it does not: kernels that add with atomics
(scatter_add_, index_add_) and cuBLAS without a fixed workspace vary run to run, so the curves agree only
to rounding unless train.deterministic=true, and even then bit for bit only on the same GPU model, driver
and software versions (README, determinism).

Host syncs: the loop reads the device once per optimizer step (`_step_totals`: one all-reduce of the
step's loss sum, token count, stop flag and per-micro-batch non-finite flags, then one `.tolist()`),
never per micro-step; the NaN refusal is decided from that reduction, so it is rank-symmetric, and it
comes before the accumulation boundary's `engine.step()`, so a non-finite loss is never applied.

Disk: periodic checkpoints (`train.save_every`, the newest `train.keep_checkpoints` kept) while training;
none at max_steps, where the student is exported instead (`final/`, ~2 B/param, not the ~14 B/param of
weights + optimizer state); once `final/` is committed every checkpoint is deleted and `exported.json`
records it, so a run killed during evaluation re-evaluates without retraining.
"""
from __future__ import annotations

import gc
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from . import checkpoint, engines, lora, runtime, signals
from .config import RunConfig, to_yaml
from .data import PROMPT_VERSION, build_train_examples, collate, load_split, pad_token_id
from .errors import ConfigError, UserError
from .evaluate import evaluate_checkpoint
from .fileio import atomic_write_json, atomic_write_text, sha256_bytes
from .hf_checkpoint import check_weights_complete, load_plan
from .losses import LossSpec
from .models import load_tokenizer
from .progress import progress_bar
from .teacher import open_teacher_targets


class TrainingDiverged(UserError):
    exit_code = 3
    symmetric = True  # decided by an all-reduce: every rank raises it at the same step


def step_indices(n_examples: int, step: int, size: int, seed: int) -> list[int]:
    """Row indices of optimizer step `step`: a fresh seeded permutation per epoch, last partial batch dropped."""
    per_epoch = n_examples // size
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * size: (k + 1) * size].tolist()


def micro_slice(batch: list[int], micro: int, rank: int, world_size: int, micro_bs: int) -> list[int]:
    """Micro-batch `micro` of `rank`: slot micro*world + rank, so (world 2, accum 1) == (world 1, accum 2)."""
    slot = micro * world_size + rank
    return batch[slot * micro_bs: (slot + 1) * micro_bs]


class RecoveryRecipe:
    def __init__(self, cfg: RunConfig):
        self.cfg, self.tr = cfg, cfg.train
        self.run_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.spec = LossSpec(kind=self.tr.loss_kind, temperature=self.tr.temperature, jsd_beta=self.tr.jsd_beta,
                             alpha=self.tr.alpha)
        self.engine = self.teacher = self.tb = None  # close() frees whatever setup() got to build

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg, tr = self.cfg, self.tr
        self.rt = runtime.init(tr.pg_timeout_minutes, tr.io_timeout_minutes)
        runtime.set_deterministic(tr.deterministic)
        runtime.set_tf32(tr.tf32, self.rt.device)
        if self.rt.device.type == "cuda":  # each stage of an iterative schedule reports its own peak
            torch.cuda.reset_peak_memory_stats(self.rt.device)
        self.student_dir, self.plan = runtime.agree(self._check_student)
        self.adapter = runtime.agree(lambda: lora.describe(self.student_dir, tr))  # a bad target: one line, every rank
        self.tok = load_tokenizer(cfg.model.tokenizer or self.student_dir)
        self.config_sha256 = sha256_bytes(to_yaml(cfg).encode())
        done = runtime.agree(lambda: checkpoint.exported(self.run_dir, self.config_sha256))
        if done is not None:  # killed after the export, before done.json: only evaluation is left
            self.meta, self.start_step = done["meta"], tr.max_steps
            return
        self.pad_id = pad_token_id(self.tok)
        self.examples = build_train_examples(self.tok, load_split(cfg.data, "train"), tr.arm, tr.positions,
                                             cfg.data.max_length, cfg.data.add_bos, cfg.data.format)
        self.global_batch = tr.micro_batch_size * self.rt.world_size * tr.grad_accum
        runtime.agree(self._check_batch)
        self.teacher = open_teacher_targets(cfg, self.spec, self.plan, self.tok, self.examples, self.student_dir)
        self.meta = self._run_meta()
        resume_step = checkpoint.check_resumable(self.ckpt_root)  # refuses another world size on every rank
        runtime.agree(lambda: self._check_same_run(resume_step > 0))
        self.engine = engines.student_engine(self.student_dir, cfg, self.spec)
        if engines.trainable_params(self.engine) != self.adapter["trainable_params"]:
            raise AssertionError(f"the engine trains {engines.trainable_params(self.engine)} parameters, "
                                 f"run_meta.json records {self.adapter['trainable_params']}")
        engines.write_sharding_report(self.run_dir, self.engine, getattr(self.teacher, "model", None))
        self.start_step = checkpoint.resume(self.engine, self.ckpt_root, resume_step)
        if self.rt.is_main:
            atomic_write_json(self.run_dir / "run_meta.json", self.meta)
            atomic_write_text(self.run_dir / "config.yaml", to_yaml(cfg))
            checkpoint.truncate_metrics(self.run_dir / "metrics.jsonl", self.start_step)
        self.tb = _tensorboard(self.run_dir) if tr.tensorboard and self.rt.is_main else None

    def close(self) -> None:
        """Free this run's engines, optimizer state and teacher before the next stage of an iterative schedule
        builds its own (at 7B the second stage would not fit beside the first's leftovers)."""
        if self.engine is not None:
            engines.destroy(self.engine)
        if self.teacher is not None:
            self.teacher.close()
        self.engine = self.teacher = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _check_student(self) -> tuple[str, dict]:
        student_dir = self.tr.student or self.cfg.prune.output_dir
        if not Path(student_dir).is_dir():
            raise ConfigError(f"config field 'train.student': no such directory '{student_dir}' "
                              "(run `distill-dist prune` first)")
        check_weights_complete(student_dir)  # headers and sizes: a truncated copy is one line, not a traceback
        return student_dir, load_plan(student_dir)

    def _check_batch(self) -> None:
        if len(self.examples) < self.global_batch:
            raise ConfigError(f"{len(self.examples)} training examples < one global batch ({self.global_batch} = "
                              f"micro_batch_size {self.tr.micro_batch_size} x world {self.rt.world_size} x "
                              f"grad_accum {self.tr.grad_accum})")

    def _run_meta(self) -> dict:
        """Everything two runs must share to be compared (the report checks it) or to resume one another."""
        cfg, tr, plan = self.cfg, self.tr, self.plan
        return {
            "arm": tr.arm, "loss": vars(self.spec) | {"positions": tr.positions}, "adapter": self.adapter,
            "plan_sha256": plan["plan_sha256"], "keep_ratio": plan["keep_ratio"],
            "prune": {"schedule": list(cfg.prune.schedule), "mode": cfg.prune.mode, "score": plan["score"]},
            "params_before": plan["params"]["total_before"], "params_after": plan["params"]["total_after"],
            "teacher": self.teacher.describe() if self.teacher else {"source": "none", "path": None, "fingerprint": None},
            "schedule": {"max_steps": tr.max_steps, "global_batch": self.global_batch, "lr": tr.lr,
                         "warmup_steps": tr.warmup_steps, "min_lr_ratio": tr.min_lr_ratio,
                         "weight_decay": tr.weight_decay, "grad_clip": tr.grad_clip, "seed": tr.seed,
                         "train_examples": len(self.examples)},
            "data": {"source": cfg.data.source, "path": cfg.data.path, "train_examples": cfg.data.train_examples,
                     "seed": cfg.data.seed, "max_length": cfg.data.max_length, "prompt_version": PROMPT_VERSION,
                     "format": cfg.data.format},
            "launch": {"world_size": self.rt.world_size, "micro_batch_size": tr.micro_batch_size,
                       "grad_accum": tr.grad_accum, "device": self.rt.device.type, "dtype": cfg.model.dtype},
        }

    def _check_same_run(self, resuming: bool) -> None:
        path = self.run_dir / "run_meta.json"
        if not resuming or not path.is_file():
            return
        old = json.loads(path.read_text())
        for key in ("arm", "loss", "plan_sha256", "schedule", "data"):
            if old.get(key) != self.meta.get(key):
                raise ConfigError(f"{self.run_dir} holds a checkpoint of a different run ({key}: {old.get(key)} vs "
                                  f"{self.meta.get(key)}); use another train.output_dir")
        if lora.settings_of(old) != lora.settings_of(self.meta):
            raise ConfigError(f"{self.run_dir} holds a checkpoint of a different run (adapter: {lora.settings_of(old)} "
                              f"vs {lora.settings_of(self.meta)}); use another train.output_dir")

    # ---------------------------------------------------------------- train

    def train(self) -> None:
        tr, rt = self.tr, self.rt
        bar = progress_bar(total=tr.max_steps, initial=self.start_step, desc=f"{tr.arm} recovery", unit="step",
                   disable=not rt.is_main)
        step = self.start_step
        try:
            while step < tr.max_steps:
                t0 = time.time()
                lr = self.engine.get_lr()[0]  # the rate this step's update uses
                batch_rows = step_indices(len(self.examples), step, self.global_batch, tr.seed)
                sums = torch.zeros(3 + tr.grad_accum, dtype=torch.float64, device=runtime.comm_device())
                for micro in range(tr.grad_accum):
                    rows = [self.examples[i] for i in micro_slice(batch_rows, micro, rt.rank, rt.world_size,
                                                                  tr.micro_batch_size)]
                    loss = self._micro_step(rows)
                    sums[0] += loss.detach().to(sums)  # on the device: no host sync per micro-step
                    sums[3 + micro] = (~torch.isfinite(loss.detach())).to(sums)
                    sums[1] += sum(len(r["input_ids"]) for r in rows)
                    if micro < tr.grad_accum - 1:
                        self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                sums[2] = float(signals.stop_requested())
                loss_sum, total_tokens, stops, *bad = runtime.all_reduce_to_host(sums)  # the step's one sync
                if any(bad):
                    self._abort_diverged(step, next(i for i, b in enumerate(bad) if b))
                self.engine.step()  # the accumulation boundary: the optimizer step
                step += 1
                self._log(step, loss_sum / tr.grad_accum / rt.world_size, lr, total_tokens, time.time() - t0, bar)
                if step < tr.max_steps and (stops or (tr.save_every and step % tr.save_every == 0)):
                    checkpoint.save(self.engine, self.ckpt_root, step, tr.keep_checkpoints)
                if stops and step < tr.max_steps:
                    bar.close()
                    if rt.is_main:
                        print(f"stop signal: checkpoint at step {step} in {self.ckpt_root}; "
                              f"exiting with {signals.EXIT_PREEMPTED} for requeue")
                    raise signals.Preempted()
        finally:
            bar.close()  # an error message then starts on its own line

    def _micro_step(self, rows: list[dict]) -> torch.Tensor:
        """Forward (teacher targets first, no grad; every rank, every micro-step) and backward of one
        micro-batch; returns the loss on the device (read once per step, in `train`)."""
        batch = collate(rows, self.pad_id, self.rt.device)
        labels = batch.pop("labels", None) if self.spec.needs_labels else None
        if not self.spec.needs_labels and "labels" in batch:
            raise AssertionError("the KL arm's batches must not carry labels")
        with self.teacher.targets(batch, rows) if self.teacher else nullcontext() as teacher:
            loss = self.engine(**batch, labels=labels, teacher=teacher)
        self.engine.backward(loss)  # DeepSpeed scales by 1/grad_accum itself
        return loss

    def _log(self, step: int, loss: float, lr: float, tokens: float, dt: float, bar) -> None:
        if not self.rt.is_main:
            return
        grad_norm = self.engine.get_global_grad_norm()
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
                  "tokens_per_s": tokens / dt, "step_time_s": dt}
        record["memory_bytes"], record["peak_memory_bytes"] = _memory_bytes(self.rt.device)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k in ("loss", "lr", "grad_norm", "tokens_per_s"):
                self.tb.add_scalar(f"train/{k}", record[k], step)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens / dt:.0f}")
        bar.update(1)

    def _abort_diverged(self, step: int, micro: int):
        found = checkpoint.latest(self.ckpt_root)
        where = f"last good checkpoint: {found[0]}" if found else "no checkpoint yet"
        raise TrainingDiverged(f"non-finite loss at step {step + 1} (micro-batch {micro}); stopped without applying "
                               f"it; {where}. Lower train.lr or check the data")

    # ---------------------------------------------------------------- save

    def save(self) -> dict:
        """Export the recovered student as a standard checkpoint (then drop every checkpoint: see the module
        docstring), evaluate it, mark the run done."""
        final_dir = self.run_dir / "final"
        if self.engine is not None:
            engines.export_student(self.engine, self.tok, self.student_dir, final_dir, self.cfg.prune.max_shard_mb)
            if self.rt.is_main:
                checkpoint.mark_exported(self.run_dir, self.ckpt_root, {
                    "step": self.tr.max_steps, "config_sha256": self.config_sha256, "meta": self.meta})
            runtime.barrier(slow=True)
        self.close()  # the evaluation loads the exported model; the engines are not needed any more
        result = {"run_dir": str(self.run_dir), "final": str(final_dir), **self.meta}
        if self.tr.eval_after:
            result["eval"] = evaluate_checkpoint(self.cfg, str(final_dir), self.run_dir / "eval", self.rt.device,
                                                 progress=False)[0]
        if self.rt.is_main:
            checkpoint.mark_finished(self.run_dir, result)
            print(f"{self.tr.arm} recovery done: {self.run_dir}")
        runtime.barrier()
        return result


def _memory_bytes(device) -> tuple[int, int]:
    """(now, peak) of this process: CUDA allocated (peak since this run's setup), else VmRSS and VmHWM."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:
        status = {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                  if k in ("VmRSS", "VmHWM")}
    return status["VmRSS"], status["VmHWM"]


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter(str(run_dir / "tensorboard"))


def run_training(cfg: RunConfig) -> dict:
    done = checkpoint.finished(Path(cfg.train.output_dir))
    if done is not None:
        return done
    recipe = RecoveryRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        return recipe.save()
    finally:
        recipe.close()
