"""The two DeepSpeed ZeRO-3 engines (trainable student, frozen teacher), the modules they wrap, export.

Why `deepspeed.initialize` directly and not accelerate's DeepSpeed plugins: the recipe needs two engines
of different kinds (a training engine and an inference engine with no optimizer), both created under
`HfDeepSpeedConfig` so `from_pretrained` partitions each parameter as it is read and no rank ever holds
a whole model, and it needs DeepSpeed's own tagged sharded checkpoints for exact resume. accelerate's
multi-plugin path would wrap the same calls behind an `Accelerator` that then owns backward, gradient
accumulation and checkpoint layout; accelerate does the process layer instead (runtime.py).

Collective safety under ZeRO-3: the student's LM head is used by `LossHead` (registered as an external
parameter of it), so the head is gathered exactly once per micro-step in forward and once in backward on
every rank, however many positions a rank supervises; the fused loss walks its chunks on the gathered
weight and never calls the head module.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import hjson
import torch

from . import lora, runtime
from .config import RunConfig
from .errors import ConfigError
from .fileio import atomic_write_json, replace_dir
from .hf_checkpoint import PLAN_FILE, ShardWriter
from .losses import DenseTeacher, LossSpec, fused_linear_loss
from .models import TORCH_DTYPES
from .packing import body_hidden

# ---------------------------------------------------------------- modules the engines wrap

class LossHead(torch.nn.Module):
    """The recovery loss through the LM head: one call per micro-step (see the module docstring)."""

    def __init__(self, lm_head: torch.nn.Linear, spec: LossSpec, chunk_size: int):
        super().__init__()
        self.spec, self.chunk_size = spec, chunk_size
        self._head = (lm_head,)  # not a submodule: its weight is this module's external parameter
        if hasattr(lm_head.weight, "ds_id"):
            import deepspeed

            deepspeed.zero.register_external_parameter(self, lm_head.weight)

    def forward(self, hidden, labels=None, teacher=None):
        return fused_linear_loss(hidden, self._head[0].weight, self.spec, labels=labels, teacher=teacher,
                                 chunk_size=self.chunk_size)


class StudentWithLoss(torch.nn.Module):
    """Forward = recovery loss, so the engine's forward/backward cover the whole step."""

    def __init__(self, lm, spec: LossSpec, chunk_size: int, peft_model=None):
        super().__init__()
        self.lm = lm
        self.loss_head = LossHead(lm.lm_head, spec, chunk_size)
        self.peft = (peft_model,)  # the PeftModel around lm (train.adapter=lora) or None; a tuple: not a submodule

    def forward(self, input_ids, attention_mask, rows, cols, position_ids=None, labels=None, teacher=None):
        hidden = body_hidden(self.lm, input_ids, attention_mask, position_ids)
        return self.loss_head(hidden[rows, cols], labels=labels, teacher=teacher)


class TeacherHidden(torch.nn.Module):
    """The teacher's final hidden states at the supervised positions (its head is applied per loss chunk)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, rows, cols, position_ids=None, **_):
        return body_hidden(self.lm, input_ids, attention_mask, position_ids)[rows, cols]


# ---------------------------------------------------------------- DeepSpeed configs

class LiveTeacher:
    """Teacher targets from the frozen unpruned model, every rank every micro-step; `CachedTeacher`
    (teacher.py) is its drop-in from disk. `model` is a ZeRO-3 inference engine (teacher.placement=sharded:
    its layers and head all-gathered on every rank each micro-step) or the whole module on this rank's
    device (replicated: nothing gathered, nothing sent)."""

    def __init__(self, model, describe: dict):
        self.model, self._describe = model, describe

    def describe(self) -> dict:
        return self._describe

    @contextmanager
    def targets(self, batch: dict, rows: list[dict]):
        head = _unwrap(self.model).lm.lm_head.weight
        with torch.no_grad():
            hidden = self.model(**batch)
        gather = nullcontext()
        if hasattr(head, "ds_id"):  # ZeRO-3: the sharded head, gathered once per micro-step on every rank
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([head], modifier_rank=None)
        with gather:
            yield DenseTeacher(hidden, head.detach())

    def close(self) -> None:
        """Release the engine (an iterative schedule builds a new teacher per stage)."""
        if hasattr(self.model, "destroy"):
            destroy(self.model)
        self.model = None


def destroy(engine) -> None:
    """`engine.destroy()` and what DeepSpeed 0.19 leaves behind, each of which keeps the module, its hooks
    and so the whole engine (optimizer state included) alive for the life of the process: the top module
    ZeRO-3 pushes onto the global `parameter_offload.FWD_MODULE_STACK` at setup and never pops, and the
    class-level lru_cache of `PartitionedParameterCoordinator.__params_to_release`, keyed by coordinator and
    module (clearing it only drops memoised sets that a live engine recomputes)."""
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    engine.destroy()
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not engine.module]
    method = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    # the lru_cache sits under an NVTX wrapper that keeps no __wrapped__: found in the wrapper's closure
    for fn in [method, *(c.cell_contents for c in getattr(method, "__closure__", None) or ())]:
        if hasattr(fn, "cache_clear"):
            fn.cache_clear()


def _unwrap(model):
    """The TeacherHidden module inside a DeepSpeed engine, or the module itself."""
    return getattr(model, "module", model)


def ds_config(path: str, cfg: RunConfig, training: bool) -> dict:
    """A DeepSpeed JSON (comments allowed) with its "auto" values filled from the run config."""
    field = "train.ds_config" if training else "train.teacher_ds_config"
    repo_default = Path(__file__).resolve().parents[2] / path  # the repo's ds_configs/, from any cwd
    if not Path(path).is_file() and not Path(path).is_absolute() and repo_default.is_file():
        path = str(repo_default)
    if not Path(path).is_file():
        raise ConfigError(f"config field '{field}': no such file '{path}'")
    ds = json.loads(json.dumps(hjson.load(open(path))))
    tr = cfg.train
    auto = {"train_micro_batch_size_per_gpu": tr.micro_batch_size, "gradient_accumulation_steps": tr.grad_accum,
            "gradient_clipping": tr.grad_clip}
    for key, value in auto.items():
        if ds.get(key) == "auto":
            ds[key] = value
    if ds.get("bf16", {}).get("enabled") == "auto":
        ds["bf16"]["enabled"] = cfg.model.dtype == "bfloat16"
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


def _load_sharded(model_dir: str, ds: dict, dtype: torch.dtype):
    """from_pretrained under HfDeepSpeedConfig: every parameter is partitioned as it is read."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds)  # noqa: F841 (from_pretrained reads it through a weak ref)
    try:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    finally:
        unset_hf_deepspeed_config()


# ---------------------------------------------------------------- engines

def student_engine(student_dir: str, cfg: RunConfig, spec: LossSpec):
    """ZeRO-3 training engine of the student with torch AdamW and warmup + cosine-to-min-lr (transformers')."""
    import deepspeed
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    tr = cfg.train
    ds = _single_rank_plain(ds_config(tr.ds_config, cfg, training=True), tr)
    lm = _load_sharded(student_dir, ds, TORCH_DTYPES[cfg.model.dtype])
    if tr.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tr.freeze_embeddings:  # a tied LM head is this same parameter: frozen with it; an untied one trains
        lm.get_input_embeddings().weight.requires_grad_(False)
    peft_model = lora.wrap(lm, tr) if tr.adapter == "lora" else None  # adapters on lm itself, in place
    student = StudentWithLoss(lm, spec, tr.chunk_size, peft_model).train()
    optimizer = torch.optim.AdamW(_param_groups(student, tr.weight_decay), lr=tr.lr, betas=(0.9, 0.95), eps=1e-8,
                                  fused=True)  # CUDA and CPU: one pass, no per-op temporaries
    if ds["zero_optimization"].get("stage") == 0:
        _clip_in_step(optimizer, tr.grad_clip)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, tr.warmup_steps, tr.max_steps,
                                                            min_lr_rate=tr.min_lr_ratio)
    engine, *_ = deepspeed.initialize(model=student, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    return engine


def _single_rank_plain(ds: dict, tr) -> dict:
    """One rank: ZeRO stage 0 in place of 3. On one rank ZeRO-3 partitions nothing, yet costs its hooks, a flat
    gradient copy and a flat fp32 copy for the optimizer each step; stage 0 is the same step (loss, clipping,
    AdamW, schedule, checkpoints) on the module's own parameters. Kept: offloading (there to save memory) and
    train.single_rank_zero3 (the ZeRO-3 path, e.g. to compare against); fp32 only (bf16 keeps ZeRO-3's fp32
    master weights and gradient accumulation)."""
    zero, half = ds.get("zero_optimization", {}), ds.get("bf16", {}).get("enabled") or ds.get("fp16", {}).get("enabled")
    if (runtime.get().world_size > 1 or tr.single_rank_zero3 or zero.get("stage") != 3 or half
            or any(k.startswith("offload") for k in zero)):
        return ds
    return {**ds, "zero_optimization": {"stage": 0}, "gradient_clipping": 0.0}  # clipped by _clip_in_step


def _clip_in_step(optimizer, max_norm: float) -> None:
    """The plain engine's clipping, first thing in the optimizer step, keeping the norm before clipping where
    the engine reads it (`_global_grad_norm`, as ZeRO-3 does); DeepSpeed's own stage-0 clipping keeps no norm."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def clip(opt, args, kwargs):
        opt._global_grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))

    optimizer.register_step_pre_hook(clip)


def _param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable parameters only; no weight decay on norms and biases. An empty group is left out (LoRA trains
    no norm): ZeRO-3 drops it, and the LR scheduler built on this optimizer must see the groups it keeps."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    no_decay = lambda n: n.endswith(("norm.weight", "bias"))  # noqa: E731
    groups = [{"params": [p for n, p in named if not no_decay(n)], "weight_decay": weight_decay},
              {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def replicated_teacher(teacher_dir: str, cfg: RunConfig) -> TeacherHidden:
    """The whole frozen teacher on this rank's device (teacher.placement=replicated), loaded straight onto
    it; it takes no part in any collective."""
    from transformers import AutoModelForCausalLM

    device = runtime.get().device
    lm = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=TORCH_DTYPES[cfg.model.dtype],
                                              device_map={"": device})
    return TeacherHidden(lm.eval().requires_grad_(False)).eval()


def teacher_engine(teacher_dir: str, cfg: RunConfig):
    """ZeRO-3 inference engine of the frozen teacher: no optimizer, no grads; returns hidden states."""
    import deepspeed

    ds = ds_config(cfg.train.teacher_ds_config, cfg, training=False)
    lm = _load_sharded(teacher_dir, ds, TORCH_DTYPES[cfg.model.dtype]).eval().requires_grad_(False)
    engine = deepspeed.initialize(model=TeacherHidden(lm), config=ds)[0]
    engine.eval()
    return engine


# ---------------------------------------------------------------- export

def export_student(engine, tok, student_dir: str, out: Path, max_shard_mb: int) -> None:
    """Consolidate the sharded student into a standard HF checkpoint, tensor by tensor (DeepSpeed's public
    GatheredParameters; rank 0 streams each into safetensors shards), written atomically. With LoRA adapters
    each adapted weight is merged as it is gathered (lora.merged_parameters) and the adapters alone are
    written beside final/ first."""
    import deepspeed

    rt = runtime.get()
    lm = engine.module.lm
    if lora.is_adapted(lm):
        export_adapter(engine, out.parent / lora.ADAPTER_DIR)
    tensors = lora.merged_parameters(lm)
    shape = lambda p: list(getattr(p, "ds_shape", p.shape))  # noqa: E731
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    writer = None
    if rt.is_main:
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # an export killed half way
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        writer = ShardWriter(tmp, [(n, ps[0].dtype, shape(ps[0])) for n, ps, _ in tensors], max_shard_mb * 2**20)
    for name, gather, value in tensors:
        with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):  # collective: every rank, same order
            if writer is not None:
                writer.write(name, value().detach().cpu())
    if rt.is_main:
        writer.finish()
        lm.config.save_pretrained(tmp)
        if getattr(lm, "generation_config", None) is not None:
            lm.generation_config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.copy2(Path(student_dir) / PLAN_FILE, tmp / PLAN_FILE)
        replace_dir(tmp, out)
    runtime.barrier(slow=True)  # the others wait for rank 0's last shard, tokenizer and rename


def export_adapter(engine, out: Path) -> None:
    """The LoRA adapters alone in peft's layout, written atomically: one gather of every adapter parameter
    (they are small) on every rank, rank 0 writes."""
    import deepspeed

    rt = runtime.get()
    named = lora.adapter_parameters(engine.module.lm)
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        gathered = {n: p.detach().cpu().clone() for n, p in named} if rt.is_main else None
    if rt.is_main:
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        for stale in out.parent.glob(f".{out.name}.tmp-*"):  # an export killed half way
            shutil.rmtree(stale)
        tmp.mkdir(parents=True)
        lora.write_adapter(engine.module.peft[0], gathered, tmp)
        replace_dir(tmp, out)
    runtime.barrier(slow=True)


def trainable_params(engine) -> int:
    """Parameters the optimizer updates, whole (ZeRO-3 shards count at their full size)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)


def write_sharding_report(run_dir: Path, student_engine_, teacher_engine_) -> None:
    """Per rank: how much of each parameter this rank holds (ZeRO-3 shards; all of it for a replicated
    teacher), and whether the teacher has an optimizer. A user checking memory layout, and the tests, read it."""
    def layout(module):
        return {n: [p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel(), getattr(p, "ds_numel", p.numel())]
                for n, p in module.named_parameters()}

    rt = runtime.get()
    report = {"rank": rt.rank, "world_size": rt.world_size, "student": layout(student_engine_.module),
              "student_zero_stage": student_engine_.zero_optimization_stage(),
              "student_has_optimizer": student_engine_.optimizer is not None}
    if teacher_engine_ is not None:
        t = _unwrap(teacher_engine_)
        # Without an optimizer DeepSpeed puts only its parameter-partitioning manager (DeepSpeedZeRoOffload,
        # no optimizer state) where the optimizer would be.
        opt = getattr(teacher_engine_, "optimizer", None)
        report.update(teacher=layout(t), teacher_optimizer=type(opt).__name__ if opt is not None else None,
                      teacher_has_optimizer=opt is not None and type(opt).__name__ != "DeepSpeedZeRoOffload",
                      teacher_requires_grad=any(p.requires_grad for p in t.parameters()))
    atomic_write_json(run_dir / "sharding" / f"rank{rt.rank}.json", report)
