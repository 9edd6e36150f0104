"""A costed plan for a run, computed from the model's config.json and the run config (never typed by hand).

Parameters of teacher and student, FLOPs per training token, tokens per epoch of CSQA train, per-GPU memory
under ZeRO-3, ZeRO-3 traffic per step and the GPU-hours of `slurm/reproduce.sh`'s sweep:

    python -m distill_dist.plan -c configs/olmo2_7b_csqa.yaml [key=value ...] [--gpus 8] [--mfu 0.35]

Every figure is a formula of stated inputs (`assumptions` in the result); the formulas are in the docstrings.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .config import RunConfig, load_config
from .errors import ConfigError, UserError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
GB = 1e9
# Measured with the OLMo2 tokenizer on CSQA train (9741 rows, lm-eval prompt, no BOS): mean 42.73 tokens,
# max 97. Used only when the data or the tokenizer is not at hand (the result says which was used).
ASSUMED_PROMPT_TOKENS, ASSUMED_MAX_TOKENS, CSQA_TRAIN_ROWS, CSQA_VALIDATION_ROWS = 42.73, 97, 9741, 1221
SWEEP_DEFAULTS = {"KEEP_RATIOS": "0.7 0.5 0.3", "DATA_SIZES": "1000 4000 9741", "SEEDS": "0", "SCORES": "gate_up_down"}


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder with a gated MLP (OLMo2, Llama): all that parameter and FLOP counts need."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = False
    head_dim: int | None = None
    qk_norm: bool = False  # OLMo2 normalises q (heads*head_dim) and k (kv_heads*head_dim)
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> "ModelShape":
        """From a config.json dict or a transformers PretrainedConfig."""
        d = cfg if isinstance(cfg, dict) else cfg.to_dict()
        try:
            return cls(hidden=d["hidden_size"], intermediate=d["intermediate_size"], layers=d["num_hidden_layers"],
                       heads=d["num_attention_heads"], kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
                       vocab=d["vocab_size"], tied=bool(d.get("tie_word_embeddings", False)), head_dim=d.get("head_dim"),
                       qk_norm=d.get("model_type") == "olmo2", attention_bias=bool(d.get("attention_bias", False)),
                       mlp_bias=bool(d.get("mlp_bias", False)))
        except KeyError as e:
            raise ConfigError(f"model config: missing field {e.args[0]!r} (expected a decoder config.json)") from None

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_matmul_params(self) -> int:
        """q, k, v, o and gate, up, down: the weights every token multiplies through, per layer."""
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        return 2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    def layer_params(self) -> int:
        q, kv = self.heads * self.hd, self.kv_heads * self.hd
        extra = 2 * self.hidden + (q + kv if self.qk_norm else 0)  # two RMSNorms per layer (+ q/k norms)
        extra += (q + 2 * kv + self.hidden) if self.attention_bias else 0
        extra += (2 * self.intermediate + self.hidden) if self.mlp_bias else 0
        return self.layer_matmul_params() + extra

    def params(self) -> int:
        vocab_mats = self.vocab * self.hidden * (1 if self.tied else 2)
        return vocab_mats + self.layers * self.layer_params() + self.hidden  # + the final norm

    def params_per_token(self) -> int:
        """Weights one generated token reads on the device: all of them but the input embedding (one row of it
        is read), unless the embedding is also the output matrix (tied). Memory-bound decoding goes no faster
        than bandwidth over these bytes, so a student/teacher ratio bounds what pruning buys in tokens/s."""
        return self.params() - (0 if self.tied else self.vocab * self.hidden)

    def body_matmul_params(self) -> int:
        return self.layers * self.layer_matmul_params()

    def largest_module(self) -> int:
        """Parameters of the largest single module (what ZeRO-3 gathers at once; DeepSpeed's 'largest layer')."""
        return max(self.vocab * self.hidden, self.largest_layer_module())

    def largest_layer_module(self) -> int:
        """Parameters of the largest module inside a decoder layer: an MLP matrix or the q projection."""
        return max(self.intermediate * self.hidden, self.heads * self.hd * self.hidden)


OLMO2_7B = ModelShape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=100352, qk_norm=True)


def student_shape(teacher: ModelShape, keep_ratio: float, round_to: int) -> ModelShape:
    from .prune import keep_count

    return replace(teacher, intermediate=keep_count(teacher.intermediate, keep_ratio, round_to))


# ---------------------------------------------------------------- FLOPs

def attention_flops(m: ModelShape, length: float) -> float:
    """QK^T and AV of one sequence: 4*L^2*heads*head_dim per layer (causal half not discounted: PaLM's convention)."""
    return 4 * m.layers * length * length * m.heads * m.hd


def forward_flops(m: ModelShape, length: float, supervised: float) -> float:
    """One sequence forward: 2 FLOPs per matmul weight per token, attention_flops, LM head only at supervised
    positions."""
    return 2 * length * m.body_matmul_params() + attention_flops(m, length) + 2 * supervised * m.vocab * m.hidden


def train_flops(m: ModelShape, length: float, supervised: float, checkpointing: bool = False,
                frozen: bool = False) -> float:
    """Forward + backward (2x forward); activation checkpointing recomputes one more forward. A frozen base
    (train.adapter=lora) skips the weight gradients: its backward is the weight matmuls once (input gradients)
    and attention twice (scores and values carry no weight; both their gradients are computed). The adapters'
    own matmuls, ~rank/hidden of a layer's, are not counted."""
    fwd = forward_flops(m, length, supervised)
    backward = fwd + attention_flops(m, length) if frozen else 2 * fwd
    return (2 if checkpointing else 1) * fwd + backward


# ---------------------------------------------------------------- tokens

def measure_lengths(cfg: RunConfig, tokenizer, micro_batch: int) -> dict:
    """Token counts of the full CSQA train split as the recipe builds it (per arm), and the padded length
    of seeded random micro-batches (right padding to the longest row of each micro-batch)."""
    from .data import build_train_examples, load_full_train

    ds = load_full_train(cfg.data)
    out = {}
    for arm in ("ce", "kl"):
        rows = build_train_examples(tokenizer, ds, arm, cfg.train.positions, cfg.data.max_length, cfg.data.add_bos,
                                    cfg.data.format)
        lengths = [len(r["input_ids"]) for r in rows]
        order = lengths[:]
        random.Random(cfg.data.seed).shuffle(order)
        batches = [order[i:i + micro_batch] for i in range(0, len(order), micro_batch)]
        out[arm] = {"rows": len(rows), "mean_tokens": sum(lengths) / len(rows), "max_tokens": max(lengths),
                    "mean_padded_tokens": sum(len(b) * max(b) for b in batches) / len(rows),
                    "mean_supervised": sum(len(r["positions"]) for r in rows) / len(rows)}
    out["source"] = f"measured: {cfg.data.path} tokenised"
    return out


def assumed_lengths(cfg: RunConfig) -> dict:
    L = min(ASSUMED_PROMPT_TOKENS, cfg.data.max_length)
    sup = L if cfg.train.positions == "all" else 1.0
    row = {"rows": CSQA_TRAIN_ROWS, "mean_tokens": L, "max_tokens": min(ASSUMED_MAX_TOKENS, cfg.data.max_length),
           "mean_padded_tokens": L, "mean_supervised": sup}
    return {"ce": row, "kl": dict(row), "source": f"assumed: mean prompt {ASSUMED_PROMPT_TOKENS} tokens (OLMo2 "
            "tokenizer on CSQA train, measured once), padding not counted"}


# ---------------------------------------------------------------- memory and traffic (bytes, per GPU)

@dataclass(frozen=True)
class Hardware:
    """What the GPU-hour and step-time figures assume; every field is printed with the plan."""

    gpus_per_node: int = 8
    nodes: int = 1
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.35  # the project's goal, not a measurement
    bus_gbs: float = 350.0  # per-GPU collective bandwidth, GB/s (NCCL all-gather bus bandwidth, 8xH100 NVLink)
    fused_adam: bool = True  # torch fused AdamW on GPU; unfused (CPU) makes one more fp32 temporary at the step
    # stage3_max_live_parameters: not set in ds_configs/, so DeepSpeed's default. It, not the prefetch bucket,
    # bounds how many parameters ZeRO-3 holds whole at once (see gathered_params).
    max_live_params: float = 1e9
    gpu_mem_gb: float = 80.0  # memory per GPU, for the teacher placement (teacher.placement=auto)

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes


LORA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_params(m: ModelShape, rank: int, targets) -> int:
    """Adapter parameters: rank * (in + out) per adapted projection per layer (a target names a projection by
    its last dotted part, as peft matches it; other names are not priced)."""
    q, kv = m.heads * m.hd, m.kv_heads * m.hd
    dims = {"q_proj": (m.hidden, q), "k_proj": (m.hidden, kv), "v_proj": (m.hidden, kv), "o_proj": (q, m.hidden),
            "gate_proj": (m.hidden, m.intermediate), "up_proj": (m.hidden, m.intermediate),
            "down_proj": (m.intermediate, m.hidden)}
    names = {t.rsplit(".", 1)[-1] for t in targets}
    return m.layers * sum(rank * (i + o) for name, (i, o) in dims.items() if name in names)


def trainable_params(m: ModelShape, tr) -> int:
    """What the optimizer updates: the LoRA adapters (train.adapter=lora), or every parameter but the input
    embedding matrix with train.freeze_embeddings (a tied LM head is that matrix), or every parameter."""
    if tr.adapter == "lora":
        return lora_params(m, tr.lora_rank, tr.lora_targets)
    return m.params() - (m.vocab * m.hidden if tr.freeze_embeddings else 0)


def frozen_params(m: ModelShape, tr) -> int:
    """Parameters the student holds but does not train: the whole base under LoRA (its adapters are extra),
    the embedding matrix with train.freeze_embeddings, else none."""
    return m.params() if tr.adapter == "lora" else m.params() - trainable_params(m, tr)


def states_with_frozen(n_frozen: int, n_trainable: int, world: int, p: int, fused_adam: bool = True) -> dict:
    """ZeRO-3 states per rank with frozen parameters: their p-byte partition only (no gradient, master or
    Adam state), the trained ones' as model_states'."""
    trained = model_states(n_trainable, world, p, fused_adam)
    return {k: p * n_frozen / world + v for k, v in trained.items()}


def model_states(n_params: int, world: int, p: int, fused_adam: bool = True) -> dict:
    """ZeRO-3 student states per rank: a p-byte parameter partition, an fp32 gradient partition (ds_configs
    set data_types.grad_accum_dtype=fp32), an fp32 master copy (none when p = 4: the fp32 partition is the
    master), Adam m and v in fp32 -- 18 B/param/world for bf16, 16 for fp32. At the optimizer step DeepSpeed
    flattens the gradient partition into a new fp32 tensor (+4 B; one sub-group of <= 1e9 params at a time),
    and unfused AdamW makes a 4-byte denominator (+4 B)."""
    steady = (p + 4 + (0 if p == 4 else 4) + 8) * n_params / world
    step = (4 + (0 if fused_adam else 4)) * min(n_params / world, 1e9)
    return {"steady": steady, "peak": steady + step}


def activation_bytes(m: ModelShape, tokens: int, positions: int, p: int, chunk: int, checkpointing: bool) -> dict:
    """Saved for backward (fused/flash attention: no L x L scores), derived for OLMo2's layer, per token:
    p * (4H + c(Hq + Hkv) + 4I) with c = 3 with q/k norms (else 2) -- layer input, q/k before and after
    their norms, v, attention output, o-proj output, MLP input, gate, up, silu(gate), their product,
    down-proj output -- plus each RMSNorm's fp32 upcast (4 B when p < 4) and normalised output (p B).
    With activation checkpointing only each layer's input (p*H) stays, plus one layer while recomputed.
    The loss materialises fp32 logits, their softmax and gradient for one chunk of positions (12*V B each)."""
    hq, hkv = m.heads * m.hd, m.kv_heads * m.hd
    c = 3 if m.qk_norm else 2
    norm_width = 2 * m.hidden + ((hq + hkv) if m.qk_norm else 0)
    per_layer_token = p * (4 * m.hidden + c * (hq + hkv) + 4 * m.intermediate) + (p + (4 if p < 4 else 0)) * norm_width
    layers = (m.layers * p * m.hidden + per_layer_token) if checkpointing else m.layers * per_layer_token
    return {"layers": tokens * layers, "loss_chunk": min(positions, chunk) * m.vocab * 12}


def zero3_traffic(n_student: int, n_teacher: int, world: int, p: int, grad_accum: int, live: bool,
                  n_trainable: int | None = None) -> dict:
    """Bytes each GPU sends (= receives) per optimizer step with ring collectives: every micro-step the
    student's parameters are all-gathered in forward and again in backward and its trainable parameters'
    gradients (all of them, or LoRA's adapters) reduce-scattered, each (w-1)/w * N * p; a live teacher adds
    one all-gather of its parameters."""
    f = (world - 1) / world
    n_trainable = n_student if n_trainable is None else n_trainable
    student = f * (2 * n_student + n_trainable) * p * grad_accum
    teacher = f * n_teacher * p * grad_accum if live else 0.0
    return {"student": student, "teacher": teacher, "total": student + teacher}


def gathered_params(traced: int, largest: int, max_live: float) -> float:
    """Parameters ZeRO-3 holds whole at once in a forward, a bound (tests/test_plan.py): once the trace is
    recorded, every submodule call (containers and norms too) prefetches another stage3_prefetch_bucket_size
    of upcoming parameters, at least one, so the prefetcher runs ahead by more parameters every layer until
    stage3_max_live_parameters are live (the bucket bounds one batch, not the total), admitting one past the
    limit: min(max_live + largest, parameters in the forward's trace). OLMo2-7B reaches the cap within a few
    layers; the 7B-wide 2-layer rehearsal (bench/rehearse_7b_wide.py) gathered its whole body (0.40 B)."""
    return min(max_live + largest, traced)


def largest_trained_module(m: ModelShape, tr) -> int:
    """The largest module a full run computes a gradient for: with the embedding frozen, an untied LM head
    still trains, a tied one is the frozen matrix."""
    return m.largest_layer_module() if tr.freeze_embeddings and m.tied else m.largest_module()


def per_gpu_memory(t: ModelShape, s: ModelShape, cfg: RunConfig, lengths: dict, hw: Hardware, p: int) -> dict:
    """Peak bytes per GPU of one recovery arm, by part; `total_live` adds the live teacher's shard (and what ZeRO-3
    gathers of it), `total_live_replicated` the whole teacher instead (teacher.placement=replicated). Gathered:
    the student's live parameters (gathered_params) + one full gradient before its reduce-scatter; the
    teacher's body in its forward, or its LM head while the loss runs (not in the engine's forward)."""
    tr = cfg.train
    ckpt = tr.gradient_checkpointing
    t_head = 0 if t.tied else t.vocab * t.hidden
    max_tokens = lengths["kl"]["max_tokens"]
    positions = tr.micro_batch_size * (max_tokens if tr.positions == "all" else 1)
    act = activation_bytes(s, tr.micro_batch_size * max_tokens, positions, p, tr.chunk_size, ckpt)
    lora = tr.adapter == "lora"
    states = states_with_frozen(frozen_params(s, tr), trainable_params(s, tr), hw.world, p, hw.fused_adam)
    # one whole gradient before its reduce-scatter: the largest trained module's, or LoRA's largest adapter pair's
    grad_whole = tr.lora_rank * (s.hidden + s.intermediate) if lora else largest_trained_module(s, tr)
    # LoRA keeps each adapter's rank-wide intermediate (A x) per token and adapted projection for backward
    lora_act = p * tr.lora_rank * len(tr.lora_targets) * s.layers * tr.micro_batch_size * max_tokens if lora else 0
    parts = {
        "model_states": states["peak"],
        "model_states_steady": states["steady"],
        "gathered": p * (gathered_params(s.params(), s.largest_module(), hw.max_live_params) + grad_whole),
        "activations": act["layers"] + lora_act,
        "loss_chunk": act["loss_chunk"],
        "teacher_shard": p * t.params() / hw.world,
        "teacher_gathered": p * max(gathered_params(t.params() - t_head, t.largest_module(), hw.max_live_params), t_head),
    }
    parts["teacher_replicated"] = p * t.params()  # the whole frozen teacher on every GPU: nothing gathered
    base = parts["model_states"] + parts["gathered"] + parts["activations"] + parts["loss_chunk"]
    parts["total_cache"] = base
    parts["total_live"] = base + parts["teacher_shard"] + parts["teacher_gathered"]
    parts["total_live_replicated"] = base + parts["teacher_replicated"]
    return parts


FIT_FRACTION = 0.9  # of a GPU's memory the plan may fill: the rest for the allocator's fragmentation, NCCL, CUDA context


def one_gpu(t: ModelShape, s: ModelShape, cfg: RunConfig, lengths: dict, hw: Hardware, p: int) -> dict:
    """Whether recovery fits ONE GPU of hw.gpu_mem_gb (FIT_FRACTION of it), full and with LoRA (this config's
    rank and targets), per teacher source: cached, live sharded (a ZeRO-3 engine of one rank: the whole teacher
    plus its gather buffers), live replicated. What a user with one GPU reads before choosing train.adapter."""
    room, out = FIT_FRACTION * hw.gpu_mem_gb * GB, {"gpu_mem_gb": hw.gpu_mem_gb}
    single = replace(hw, gpus_per_node=1, nodes=1)
    for adapter in ("full", "lora"):
        c = copy.deepcopy(cfg)
        c.train.adapter = adapter
        c.train.freeze_embeddings = cfg.train.freeze_embeddings and adapter == "full"  # LoRA refuses it
        m = per_gpu_memory(t, s, c, lengths, single, p)
        totals = {"cache": m["total_cache"], "live_sharded": m["total_live"], "live_replicated": m["total_live_replicated"]}
        out[adapter] = {"trainable_params": trainable_params(s, c.train), "model_states": m["model_states"],
                        **{k: {"memory": v, "fits": v <= room} for k, v in totals.items()}}
    out["full"] |= {"freeze_embeddings": cfg.train.freeze_embeddings}
    out["lora"] |= {"rank": cfg.train.lora_rank, "targets": list(cfg.train.lora_targets)}
    return out


def choose_placement(memory: dict, gpu_bytes: float | None, asked: str = "auto") -> tuple[str, str]:
    """teacher.placement: the asked one, or (auto) replicated when the per-GPU total with the whole teacher
    fits FIT_FRACTION of the GPU (no teacher all-gather per micro-step, no teacher traffic), else the
    ZeRO-3 shard (the user's design). Returns (placement, why)."""
    if asked != "auto":
        return asked, f"teacher.placement={asked}"
    if gpu_bytes is None:
        return "sharded", "no GPU to size a replicated teacher against: ZeRO-3 shards"
    need, room = memory["total_live_replicated"], FIT_FRACTION * gpu_bytes
    if need <= room:
        return "replicated", (f"replicated fits: {need / GB:.1f} GB per GPU <= {FIT_FRACTION:.0%} of "
                              f"{gpu_bytes / GB:.0f} GB; no teacher all-gather per micro-step")
    return "sharded", (f"replicated needs {need / GB:.1f} GB per GPU > {FIT_FRACTION:.0%} of {gpu_bytes / GB:.0f} GB; "
                       f"ZeRO-3 shards ({memory['total_live'] / GB:.1f} GB)")


def runtime_placement(cfg: RunConfig, teacher_config: dict, student_config: dict, world: int, max_tokens: int,
                      gpu_bytes: float | None) -> tuple[str, str]:
    """The placement for a run about to start: the same memory formulas as the plan, with this run's world
    size, its student's real shape (an iterative stage's) and its longest training row."""
    if world == 1 and cfg.teacher.placement == "auto":
        return "replicated", "one rank: its ZeRO-3 shard would be the whole teacher; replicated gathers nothing"
    t, s = ModelShape.from_config(teacher_config), ModelShape.from_config(student_config)
    lengths = {"kl": {"max_tokens": max_tokens}}
    memory = per_gpu_memory(t, s, cfg, lengths, Hardware(gpus_per_node=world), DTYPE_BYTES[cfg.model.dtype])
    return choose_placement(memory, gpu_bytes, cfg.teacher.placement)


def step_seconds(s: ModelShape, t: ModelShape, cfg: RunConfig, lengths: dict, hw: Hardware, live: bool,
                 replicated: bool = False) -> dict:
    """One optimizer step per GPU: compute at the assumed MFU, and the ZeRO-3 traffic at the assumed bandwidth
    (a lower bound on the step when it is not hidden behind compute); a replicated live teacher computes
    but moves nothing."""
    tr, p = cfg.train, DTYPE_BYTES[cfg.model.dtype]
    L, S = lengths["kl"]["mean_padded_tokens"], lengths["kl"]["mean_supervised"]
    seqs = tr.micro_batch_size * tr.grad_accum
    flops = seqs * (train_flops(s, L, S, tr.gradient_checkpointing, tr.adapter == "lora")
                    + (forward_flops(t, L, S) if live else 0.0))
    traffic = zero3_traffic(s.params(), t.params(), hw.world, p, tr.grad_accum, live and not replicated,
                            trainable_params(s, tr))["total"]
    return {"compute_s": flops / (hw.mfu * hw.peak_tflops * 1e12), "comm_s": traffic / (hw.bus_gbs * GB)}


# ---------------------------------------------------------------- the sweep

def sweep_from_script(path: str | Path = "slurm/reproduce.sh") -> dict:
    """KEEP_RATIOS, DATA_SIZES and SEEDS as `NAME=${NAME:-default}` in the script (SWEEP_DEFAULTS when a name
    is not there, e.g. SEEDS: the script runs one seed, the config's)."""
    text = Path(path).read_text() if Path(path).is_file() else ""
    out = {}
    for name, default in SWEEP_DEFAULTS.items():
        m = re.search(rf"^{name}=\$\{{{name}:-([^}}]*)\}}", text, re.M)
        out[name] = (m.group(1) if m else default).split()
    return {"keep_ratios": [float(x) for x in out["KEEP_RATIOS"]], "data_sizes": [int(x) for x in out["DATA_SIZES"]],
            "seeds": [int(x) for x in out["SEEDS"]], "scores": out["SCORES"],
            "source": str(path) if text else "built-in defaults"}


def calibration_cost(t: ModelShape, cfg: RunConfig, lengths: dict, hw: Hardware, score: str) -> dict:
    """One calibration pass (calibrate.py) of the teacher for a calibration score, 0 for the L2 scores.

    prune.calibration_samples texts of the training prompts' mean length (`train`; a jsonl source is
    assumed alike): a forward per text with no LM head (activation, wanda), or for taylor a forward with the
    head at every position plus the backward to the activations only (no weight gradients: ~1 more forward).
    Memory per GPU: the teacher's ZeRO-3 shard and gathered parameters, and for taylor the activations of one
    batch (calibration_batch_size x max tokens) saved for backward plus one loss chunk. GPU-hours at the
    plan's MFU over the plan's GPUs (the pass is sharded over them)."""
    from .config import CALIBRATION_SCORES

    p, pc = DTYPE_BYTES[cfg.model.dtype], cfg.prune
    if score not in CALIBRATION_SCORES:
        return {"flops": 0.0, "gpu_hours": 0.0, "memory_per_gpu": 0.0, "tokens": 0}
    L = lengths["kl"]["mean_tokens"]
    taylor = score == "taylor"
    flops = pc.calibration_samples * (2 if taylor else 1) * forward_flops(t, L, L - 1 if taylor else 0)
    t_head = 0 if t.tied else t.vocab * t.hidden
    memory = p * t.params() / hw.world + p * max(gathered_params(t.params() - t_head, t.largest_module(),
                                                                 hw.max_live_params), t_head)
    if taylor:
        batch_tokens = pc.calibration_batch_size * lengths["kl"]["max_tokens"]
        act = activation_bytes(t, batch_tokens, batch_tokens, p, cfg.train.chunk_size, False)
        memory += act["layers"] + act["loss_chunk"]
    return {"flops": flops, "gpu_hours": flops / (hw.mfu * hw.peak_tflops * 1e12) / 3600, "memory_per_gpu": memory,
            "tokens": pc.calibration_samples * L}


def sweep_cost(t: ModelShape, cfg: RunConfig, lengths: dict, hw: Hardware, sweep: dict) -> dict:
    """FLOPs and GPU-hours of every arm of the sweep, with a live teacher and with the cached one.

    An arm runs train.max_steps optimizer steps of micro_batch * world * grad_accum sequences at the mean
    padded length; live KL adds a teacher forward per sequence; the cache is one teacher forward over the
    whole train split, shared by every KL arm; evaluation (teacher + every arm) is bounded by 5 forwards
    of prompt + answer per validation question with the LM head at every position. Pruning with an L2 score
    is I/O only; with a calibration score each prune job (keep ratio x score) adds its calibration pass.
    `gpu_hours_comm_bound`: the arms again with each step taking max(compute, ZeRO-3 traffic time).
    """
    tr = cfg.train
    ckpt = tr.gradient_checkpointing
    seqs = tr.max_steps * tr.micro_batch_size * hw.world * tr.grad_accum
    L = {arm: lengths[arm]["mean_padded_tokens"] for arm in ("ce", "kl")}
    S = {arm: lengths[arm]["mean_supervised"] for arm in ("ce", "kl")}
    teacher_fwd = forward_flops(t, L["kl"], S["kl"])
    student, live_teacher, runs = 0.0, 0.0, 0
    bound = {"live": 0.0, "live_replicated": 0.0, "cache": 0.0}  # GPU-seconds of the arms when traffic is not hidden
    scores = sweep.get("scores", [cfg.prune.score])
    per_ratio = len(sweep["data_sizes"]) * len(sweep["seeds"]) * len(scores)
    calibration = len(sweep["keep_ratios"]) * sum(calibration_cost(t, cfg, lengths, hw, sc)["flops"] for sc in scores)
    for r in sweep["keep_ratios"]:
        s = student_shape(t, r, cfg.prune.round_to)
        frozen = tr.adapter == "lora"
        student += per_ratio * seqs * (train_flops(s, L["ce"], S["ce"], ckpt, frozen)
                                       + train_flops(s, L["kl"], S["kl"], ckpt, frozen))
        live_teacher += per_ratio * seqs * teacher_fwd
        runs += 2 * per_ratio
        ce_step = max(step_seconds(s, t, cfg, lengths, hw, False).values())
        for src in bound:
            kl_step = max(step_seconds(s, t, cfg, lengths, hw, src != "cache", src == "live_replicated").values())
            bound[src] += per_ratio * tr.max_steps * hw.world * (ce_step + kl_step)
    L_eval = lengths["kl"]["mean_tokens"] + 1
    evals = (runs + 1) * CSQA_VALIDATION_ROWS * 5 * forward_flops(t, L_eval, L_eval)
    cache = lengths["kl"]["rows"] * teacher_fwd
    flops = {"students": student, "teacher_live": live_teacher, "teacher_cache": cache, "evals": evals,
             "calibration": calibration, "total_live": student + live_teacher + evals + calibration,
             "total_cache": student + cache + evals + calibration}
    hours = {k: v / (hw.mfu * hw.peak_tflops * 1e12) / 3600 for k, v in flops.items()}
    other = {"live": hours["evals"] + hours["calibration"], "live_replicated": hours["evals"] + hours["calibration"],
             "cache": hours["evals"] + hours["teacher_cache"] + hours["calibration"]}
    comm_bound = {f"total_{src}": bound[src] / 3600 + other[src] for src in bound}
    return {"runs": runs, "sequences_per_run": seqs, "flops": flops, "gpu_hours": hours,
            "gpu_hours_comm_bound": comm_bound}


# ---------------------------------------------------------------- the plan

def costed_plan(cfg: RunConfig, model_config: dict | None = None, tokenizer=None, hw: Hardware = Hardware(),
                sweep: dict | None = None) -> dict:
    """Everything above for one run config. model_config: config.json of the teacher (default: model.path's,
    else the built-in OLMo2-7B shape, recorded as such); tokenizer: to measure CSQA's lengths (else assumed)."""
    model_source = "given"
    if model_config is None:
        path = Path(cfg.model.path or "") / "config.json"
        model_config = json.loads(path.read_text()) if path.is_file() else None
        model_source = str(path) if model_config is not None else "built-in OLMo2-7B shape (no model.path/config.json)"
    t = ModelShape.from_config(model_config) if model_config is not None else OLMO2_7B
    s = student_shape(t, cfg.prune.keep_ratio, cfg.prune.round_to)
    tr = cfg.train
    lengths = measure_lengths(cfg, tokenizer, tr.micro_batch_size) if tokenizer is not None else assumed_lengths(cfg)
    p = DTYPE_BYTES[cfg.model.dtype]
    sweep = sweep or sweep_from_script()
    L, S = lengths["kl"]["mean_padded_tokens"], lengths["kl"]["mean_supervised"]
    ckpt = tr.gradient_checkpointing
    flops_token = {"student_train": train_flops(s, L, S, ckpt, tr.adapter == "lora") / L,
                   "teacher_forward": forward_flops(t, L, S) / L}
    traffic = {src: zero3_traffic(s.params(), t.params(), hw.world, p, tr.grad_accum, src == "live",
                                  trainable_params(s, tr)) for src in ("live", "cache")}
    step_time = {src: step_seconds(s, t, cfg, lengths, hw, src == "live") for src in ("live", "cache")}
    memory = per_gpu_memory(t, s, cfg, lengths, hw, p)
    placement, why = choose_placement(memory, hw.gpu_mem_gb * GB, cfg.teacher.placement)
    return {
        "teacher": {**asdict(t), "params": t.params(), "params_per_token": t.params_per_token(),
                    "source": model_source},
        "student": {**asdict(s), "params": s.params(), "params_per_token": s.params_per_token(),
                    "keep_ratio": cfg.prune.keep_ratio,
                    "round_to": cfg.prune.round_to},
        "flops_per_token": flops_token,
        "tokens": lengths,
        "tokens_per_epoch": {arm: lengths[arm]["rows"] * lengths[arm]["mean_tokens"] for arm in ("ce", "kl")},
        "memory_per_gpu": memory,
        "zero3_bytes_per_step": traffic,
        # A replicated live teacher moves no teacher bytes: its traffic is the cached run's (student only).
        "teacher_placement": {"choice": placement, "why": why,
                              "sharded": {"memory": memory["total_live"], "traffic": traffic["live"]["total"]},
                              "replicated": {"memory": memory["total_live_replicated"],
                                             "traffic": traffic["cache"]["total"]}},
        "step_time": step_time,
        "one_gpu": one_gpu(t, s, cfg, lengths, hw, p),
        "calibration": {"score": cfg.prune.score, "samples": cfg.prune.calibration_samples,
                        **calibration_cost(t, cfg, lengths, hw, cfg.prune.score)},
        "sweep": {**sweep, **sweep_cost(t, cfg, lengths, hw, sweep)},
        "assumptions": {**asdict(hw), "world": hw.world, "dtype": cfg.model.dtype, "micro_batch": tr.micro_batch_size,
                        "grad_accum": tr.grad_accum, "max_steps": tr.max_steps,
                        "freeze_embeddings": tr.freeze_embeddings, "positions": tr.positions,
                        "max_length": cfg.data.max_length, "activation_checkpointing": ckpt},
    }


# ---------------------------------------------------------------- rendering and CLI

KQUANT_BLOCK = 256


def kquant_advice(intermediate: int) -> str:
    """Whether the pruned MLP width quantizes as asked in llama.cpp: a K-quant falls back to another type
    (q5_0 for Q4_K_M) for ffn_down when its rows (the intermediate width) are not a multiple of 256."""
    if intermediate % KQUANT_BLOCK == 0:
        return f"intermediate {intermediate} = {intermediate // KQUANT_BLOCK} x {KQUANT_BLOCK}: every MLP matrix fits"
    return (f"intermediate {intermediate} is not a multiple of {KQUANT_BLOCK}: ffn_down falls back to another type; "
            f"prune.round_to={KQUANT_BLOCK} avoids it")


def _g(b: float) -> str:
    return f"{b / GB:.2f} GB"


def one_gpu_rows(og: dict, student_params: int) -> list[str]:
    """The one-GPU rows: full and LoRA recovery, per teacher source, with the verdict against the GPU's size."""
    rows = []
    for adapter in ("full", "lora"):
        x = og[adapter]
        frozen = f" with the embeddings frozen ({x['trainable_params'] / 1e6:.1f} M trainable)"
        what = (f"full recovery{frozen if x['freeze_embeddings'] else ''}" if adapter == "full" else
                f"LoRA r{x['rank']} on {', '.join(x['targets'])} ({x['trainable_params'] / 1e6:.1f} M trainable, "
                f"{x['trainable_params'] / student_params:.2%})")
        cells = " / ".join(f"{_g(x[k]['memory'])} {'fits' if x[k]['fits'] else 'does not fit'}"
                           for k in ("cache", "live_sharded", "live_replicated"))
        rows.append(f"| one {og['gpu_mem_gb']:.0f} GB GPU, {what}: model states {_g(x['model_states'])}; total with "
                    f"cached / live sharded / live replicated teacher (fits: <= {FIT_FRACTION:.0%}) | {cells} |")
    return rows


def render_markdown(plan: dict) -> str:
    """The plan as the README's cluster-section tables, with every assumption stated under them."""
    t, s, a, m = plan["teacher"], plan["student"], plan["assumptions"], plan["memory_per_gpu"]
    f, sw, tok = plan["flops_per_token"], plan["sweep"], plan["tokens"]
    lines = [
        "| quantity | value |", "|---|---|",
        f"| teacher parameters | {t['params'] / 1e9:.3f} B |",
        f"| student parameters (keep {s['keep_ratio']}, intermediate {s['intermediate']}) | {s['params'] / 1e9:.3f} B |",
        f"| on the edge: llama.cpp K-quants (Q4_K_M, ...) take rows in blocks of {KQUANT_BLOCK} | "
        f"{kquant_advice(s['intermediate'])} |",
        f"| on the edge: weights each generated token reads, student / teacher (memory-bound decoding; "
        f"{'the tied embedding is the output matrix' if t['tied'] else 'one embedding row'}) | "
        f"{s['params_per_token'] / 1e6:,.1f} M / {t['params_per_token'] / 1e6:,.1f} M = "
        f"{s['params_per_token'] / t['params_per_token']:.1%} |",
        f"| FLOPs per token, student forward+backward | {f['student_train'] / 1e9:.2f} GFLOP |",
        f"| FLOPs per token, teacher forward (live KL) | {f['teacher_forward'] / 1e9:.2f} GFLOP |",
        f"| CSQA train tokens per epoch ({tok['kl']['rows']} rows, mean {tok['kl']['mean_tokens']:.1f}, "
        f"padded {tok['kl']['mean_padded_tokens']:.1f} at micro-batch {a['micro_batch']}) | "
        f"{plan['tokens_per_epoch']['kl'] / 1e6:.3f} M |",
        f"| per GPU: model states{' (embedding frozen: its weights only)' if a['freeze_embeddings'] else ''} "
        f"(peak at the optimizer step; steady {_g(m['model_states_steady'])}) | "
        f"{_g(m['model_states'])} |",
        f"| per GPU: gathered parameters (up to stage3_max_live_parameters) + one gradient | {_g(m['gathered'])} |",
        f"| per GPU: activations (micro-batch {a['micro_batch']} x {tok['kl']['max_tokens']} tokens) + loss chunk | "
        f"{_g(m['activations'])} + {_g(m['loss_chunk'])} |",
        f"| per GPU: live teacher shard + gathered parameters | {_g(m['teacher_shard'])} + {_g(m['teacher_gathered'])} |",
        f"| per GPU total: cached / live teacher | {_g(m['total_cache'])} / {_g(m['total_live'])} |",
    ]
    tp = plan["teacher_placement"]
    for name in ("sharded", "replicated"):
        lines.append(f"| live teacher {name}{' (ZeRO-3)' if name == 'sharded' else ' (whole, every GPU)'}: per GPU "
                     f"total / ZeRO-3 traffic per step | {_g(tp[name]['memory'])} / {_g(tp[name]['traffic'])} |")
    lines.append(f"| teacher placement (teacher.placement=auto, {a['gpu_mem_gb']:.0f} GB GPUs) | {tp['choice']}: "
                 f"{tp['why']} |")
    lines += one_gpu_rows(plan["one_gpu"], s["params"])
    for src in ("cache", "live"):
        tr, st = plan["zero3_bytes_per_step"][src], plan["step_time"][src]
        lines.append(f"| ZeRO-3 traffic per step per GPU, {src} teacher (compute {st['compute_s'] * 1e3:.0f} ms vs "
                     f"comm {st['comm_s'] * 1e3:.0f} ms) | {_g(tr['total'])} |")
    c = plan["calibration"]
    if c["flops"]:
        lines.append(f"| calibration pass, prune.score={c['score']} ({c['samples']} texts, {c['tokens']:.0f} tokens): "
                     f"FLOPs, GPU-hours, per GPU memory | {c['flops'] / 1e12:.1f} TFLOP, {c['gpu_hours']:.4f}, "
                     f"{_g(c['memory_per_gpu'])} |")
    h = sw["gpu_hours"]
    lines += [
        f"| sweep: {sw['runs']} arms (keep {sw['keep_ratios']} x scores {sw['scores']} x sizes "
        f"{sw['data_sizes']} x seeds {sw['seeds']} x CE/KL), {sw['sequences_per_run']} sequences each; calibration "
        f"passes {h['calibration']:.3f} GPU-hours | |",
        f"| GPU-hours, live teacher | {h['total_live']:.2f} |",
        f"| GPU-hours, cached teacher (cache itself {h['teacher_cache']:.2f}) | {h['total_cache']:.2f} |",
        f"| GPU-hours if ZeRO-3 traffic is not hidden (step = max(compute, traffic)): live sharded / live "
        f"replicated / cached | {sw['gpu_hours_comm_bound']['total_live']:.2f} / "
        f"{sw['gpu_hours_comm_bound']['total_live_replicated']:.2f} / {sw['gpu_hours_comm_bound']['total_cache']:.2f} |",
        "",
        f"Assumptions: {a['world']} GPUs ({a['nodes']} node(s) x {a['gpus_per_node']}), {a['dtype']}, peak "
        f"{a['peak_tflops']:.0f} TFLOP/s at MFU {a['mfu']:.0%}, collective bandwidth {a['bus_gbs']:.0f} GB/s per GPU; "
        f"micro-batch {a['micro_batch']}, grad-accum {a['grad_accum']}, {a['max_steps']} steps per arm (the data size "
        f"changes epochs, not cost), positions={a['positions']}, activation checkpointing "
        f"{'on' if a['activation_checkpointing'] else 'off'}. Model: {t['source']}. Lengths: {tok['source']}. "
        f"Sweep: {sw['source']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from .cli import config_epilog  # cli imports this module only inside its main()

    ap = argparse.ArgumentParser(prog="distill-dist plan", description=__doc__.splitlines()[0],
                                 epilog=config_epilog("plan"))
    ap.add_argument("--config", "-c", help="YAML run config (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    ap.add_argument("--model-config", help="the teacher's config.json (default: model.path's, else OLMo2-7B)")
    ap.add_argument("--gpus", type=int, default=Hardware.gpus_per_node, help="GPUs per node")
    ap.add_argument("--nodes", type=int, default=Hardware.nodes)
    ap.add_argument("--mfu", type=float, default=Hardware.mfu)
    ap.add_argument("--peak-tflops", type=float, default=Hardware.peak_tflops, help="dense bf16 TFLOP/s per GPU")
    ap.add_argument("--bus-gbs", type=float, default=Hardware.bus_gbs, help="collective bandwidth per GPU, GB/s")
    ap.add_argument("--gpu-mem-gb", type=float, default=Hardware.gpu_mem_gb, help="memory per GPU, GB (teacher placement)")
    ap.add_argument("--sweep-script", default="slurm/reproduce.sh")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON instead of markdown")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"distill-dist plan: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    cfg = load_config(args.config, args.overrides)
    if not 0 < args.mfu <= 1 or args.gpus < 1 or args.nodes < 1:
        raise ConfigError("--mfu must be in (0, 1], --gpus and --nodes positive integers")
    model_config = json.loads(Path(args.model_config).read_text()) if args.model_config else None
    tok = _tokenizer_or_none(cfg)
    hw = Hardware(gpus_per_node=args.gpus, nodes=args.nodes, mfu=args.mfu, peak_tflops=args.peak_tflops,
                  bus_gbs=args.bus_gbs, gpu_mem_gb=args.gpu_mem_gb)
    plan = costed_plan(cfg, model_config, tok, hw, sweep_from_script(args.sweep_script))
    print(json.dumps(plan, indent=2) if args.json else render_markdown(plan))
    return 0


def _tokenizer_or_none(cfg: RunConfig):
    """The run's tokenizer and data when both are at hand (lengths measured), else None (lengths assumed)."""
    from .models import load_tokenizer

    spec = cfg.model.tokenizer or cfg.model.path
    if not spec or not Path(spec).exists() or (cfg.data.source == "jsonl" and not Path(cfg.data.path).is_dir()):
        return None
    return load_tokenizer(spec)


if __name__ == "__main__":
    sys.exit(main())
