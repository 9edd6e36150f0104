"""`distill-dist <command> [--config FILE.yaml] [key=value ...]`: one entry point for every stage.

Bad input ends in one line on stderr (`distill-dist: error: ...`) and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import CALIBRATION_SCORES, READ_BY, RunConfig, load_config, require_local_or_hub, to_yaml
from .errors import ConfigError, UserError
from .fileio import atomic_write_text
from .progress import library_bars_only_on_a_terminal

EXIT_USER_ERROR = 2


def _save_config(cfg, out_dir: Path, name: str) -> None:
    atomic_write_text(Path(out_dir) / name, to_yaml(cfg))


# ---------------------------------------------------------------- prune

def cmd_prune(cfg: RunConfig) -> dict:
    from .models import load_tokenizer
    from .prune import prune_checkpoint

    require_local_or_hub(cfg.model.path, "model.path")
    if not Path(cfg.model.path).is_dir():
        raise ConfigError(f"config field 'model.path': pruning streams local safetensors; download "
                          f"'{cfg.model.path}' first (huggingface-cli download) and point model.path at it")
    # Iterative schedules start from the first ratio; recovery prunes further between stages.
    ratio = cfg.prune.schedule[0] if cfg.prune.mode == "iterative" else cfg.prune.keep_ratio
    tok = load_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else None
    if cfg.prune.score in CALIBRATION_SCORES:  # forward (taylor: + backward) passes, ZeRO-3 sharded under torchrun
        from . import runtime
        from .calibrate import prune_calibrated

        plan = prune_calibrated(cfg, ratio, tokenizer=tok)
        if not runtime.get().is_main:
            return plan
    else:
        plan = prune_checkpoint(cfg.model.path, cfg.prune.output_dir, ratio, cfg.prune.score, cfg.prune.round_to,
                                cfg.prune.max_shard_mb, tokenizer=tok, overwrite=cfg.prune.overwrite)
    _save_config(cfg, Path(cfg.prune.output_dir), "distill_dist_prune.yaml")
    return plan


# ---------------------------------------------------------------- eval

def cmd_eval(cfg: RunConfig) -> dict | None:
    import torch

    from . import runtime
    from .evaluate import evaluate_checkpoint

    model_path = cfg.eval.model or cfg.model.path
    if cfg.eval.backend == "llamacpp" or str(model_path).endswith(".gguf"):
        return _eval_gguf(cfg, model_path)
    require_local_or_hub(model_path, "eval.model" if cfg.eval.model else "model.path")
    rt = runtime.init(cfg.train.pg_timeout_minutes)
    device = torch.device("cpu") if cfg.eval.device == "cpu" else rt.device
    if cfg.eval.device == "cuda" and device.type != "cuda":
        raise ConfigError("config field 'eval.device' = 'cuda': no CUDA device is visible")
    out_dir = Path(cfg.eval.output_dir or Path(cfg.output_dir) / "eval" / Path(model_path).name)
    m, meta = evaluate_checkpoint(cfg, model_path, out_dir, device)
    if not rt.is_main:
        return None
    _save_config(cfg, out_dir, "config.yaml")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{cfg.eval.split}: n={m['n']} {_accuracies(m, fmt)} nll={fmt(m['nll'])} brier={fmt(m['brier'])} "
          f"ece={fmt(m['ece'])} entropy={fmt(m['entropy'])} ({meta['wall_s']:.1f}s) -> {out_dir / 'eval.json'}")
    return {"metrics": m, **meta}


def _eval_gguf(cfg: RunConfig, model_path: str | None) -> dict:
    """eval.backend=llamacpp: a GGUF file scored inside llama.cpp, single process, CPU."""
    from .evaluate import evaluate_gguf

    if cfg.eval.backend != "llamacpp":
        raise ConfigError(f"config field 'eval.model' = {model_path!r}: a GGUF file is scored with eval.backend=llamacpp")
    if not model_path or not str(model_path).endswith(".gguf") or not Path(model_path).is_file():
        raise ConfigError(f"config field 'eval.model' = {model_path!r}: eval.backend=llamacpp takes a GGUF file "
                          "written by `distill-dist export`")
    path = Path(model_path)
    out_dir = Path(cfg.eval.output_dir or Path(cfg.output_dir) / "eval" / path.parent.name / path.stem)
    m, meta = evaluate_gguf(cfg, str(path), out_dir)
    _save_config(cfg, out_dir, "config.yaml")
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    speed = ", ".join(f"{s['threads']} thr: pp {s['prompt_tok_s']:.0f} tg {s['gen_tok_s']:.0f} tok/s"
                      for s in meta["edge"]["speed"])
    print(f"{cfg.eval.split} [{meta['model']['gguf_type']}, {meta['edge']['file_bytes'] / 1e6:.2f} MB, peak RSS "
          f"{meta['edge']['peak_rss_bytes'] / 1e6:.0f} MB, load {meta['edge']['load_s']:.2f}s; {speed}]: n={m['n']} "
          f"{_accuracies(m, fmt)} nll={fmt(m['nll'])} ece={fmt(m['ece'])} ({meta['wall_s']:.1f}s) -> {out_dir / 'eval.json'}")
    return {"metrics": m, **meta}


def _accuracies(m: dict, fmt) -> str:
    """The headline accuracy first (marked), then the other normalisations: 'acc_per_char*=0.4800 acc=0.3950 ...';
    NLL, Brier and ECE printed after it are the headline's."""
    from .evaluate import ACCURACIES

    names = [m["headline"]] + [k for k in ACCURACIES if k != m["headline"]]
    return " ".join(f"{k}{'*' if k == m['headline'] else ''}={fmt(m[k])}" for k in names)


# ---------------------------------------------------------------- export

def cmd_export(cfg: RunConfig) -> dict:
    from .export import export

    src = cfg.export.model or cfg.model.path
    if not src:
        raise ConfigError("config field 'export.model' is required (a checkpoint dir: a run's final/, a pruned "
                          "or the teacher checkpoint)")
    src_path = Path(src)
    name = src_path.parent.name if src_path.name == "final" else src_path.name  # a run's final/: the run's name
    out_dir = Path(cfg.export.output_dir or Path(cfg.output_dir) / "gguf" / name)
    manifest = export(src_path, out_dir, list(cfg.export.types), cfg.export.pre_tokenizer, cfg.export.threads)
    _save_config(cfg, out_dir, "distill_dist_export.yaml")
    print(f"export: {out_dir / 'manifest.json'} ({', '.join(cfg.export.types)})")
    return manifest


# ---------------------------------------------------------------- import

def cmd_import(cfg: RunConfig) -> dict:
    from .gguf_import import import_gguf

    out = cfg.gguf_import.output_dir or cfg.model.path
    if not out:
        raise ConfigError("config field 'gguf_import.output_dir' is required (where to write the checkpoint; "
                          "null = model.path)")
    return import_gguf(cfg.gguf_import.file, out, cfg.gguf_import.dtype, cfg.gguf_import.overwrite)


# ---------------------------------------------------------------- train

def cmd_train(cfg: RunConfig) -> dict | None:
    from .train import run_recovery

    return run_recovery(cfg)


# ---------------------------------------------------------------- cache-teacher

def cmd_cache_teacher(cfg: RunConfig, verify: bool = False) -> dict | None:
    from .cache import run_cache_teacher

    return run_cache_teacher(cfg, verify=verify)


# ---------------------------------------------------------------- report

def cmd_report(cfg: RunConfig) -> str:
    from .report import make_report, pruned_eval_paths

    md, _ = make_report(cfg.report.runs, cfg.report.output_dir, cfg.report.teacher_eval,
                        pruned_eval_paths(cfg.report.pruned_eval), cfg.report.edge)
    print(md)
    from .report import EDGE_CSV, EDGE_PLOT, PLOTS, SCORE_PLOT

    out = Path(cfg.report.output_dir)
    by_score = f", {SCORE_PLOT}" if (out / SCORE_PLOT).is_file() else ""
    edge = f", {EDGE_CSV}, {EDGE_PLOT}" if (out / EDGE_PLOT).is_file() and cfg.report.edge else ""
    print(f"report: {out / 'report.md'} (+ report.csv, {', '.join(PLOTS)}{by_score}{edge})")
    return md


# ---------------------------------------------------------------- make-tiny

def cmd_make_tiny(cfg: RunConfig) -> Path:
    from .models import build_tiny_model, load_tokenizer

    if not cfg.model.tokenizer:
        raise ConfigError("config field 'model.tokenizer' is required by make-tiny (a tokenizer dir or tokenizer.json)")
    require_local_or_hub(cfg.model.tokenizer, "model.tokenizer", kind="path")
    if not cfg.model.path:
        raise ConfigError("config field 'model.path' is required by make-tiny (where to write the model)")
    tok = load_tokenizer(cfg.model.tokenizer)
    model = build_tiny_model(cfg.tiny, tok)
    out = Path(cfg.model.path)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"wrote a random {cfg.tiny.architecture} model ({sum(p.numel() for p in model.parameters()):,} params, "
          f"vocab {model.config.vocab_size}) to {out}")
    return out


# ---------------------------------------------------------------- config

def cmd_config(cfg: RunConfig) -> str:
    """The config a command would run with, after the file, the overrides, interpolation and validation."""
    text = to_yaml(cfg)
    print(text, end="")
    return text


# ---------------------------------------------------------------- demo

def cmd_demo(cfg: RunConfig) -> str:
    """The CPU demo: synthetic task, tiny OLMo2 teacher, prune, both recovery arms on 2 ranks, GGUF, report."""
    from .demo import run_demo

    return run_demo(cfg, cmd_prune, cmd_eval, cmd_export)


COMMANDS = {
    "prune": (cmd_prune, "structured pruning of MLP neurons (L2 or calibration scores) -> a smaller standard checkpoint"),
    "eval": (cmd_eval, "CommonsenseQA accuracy and calibration (runs under torchrun for sharded eval)"),
    "train": (cmd_train, "recover the pruned student: train.arm=ce (labels) or kl (teacher); torchrun for ZeRO-3"),
    "cache-teacher": (cmd_cache_teacher, "precompute the teacher's top-k log-probs for the KL arm (teacher.source=cache)"),
    "export": (cmd_export, "llama.cpp GGUF files of a checkpoint (export.types: f16, q8_0, q4_k_m, ...) + manifest"),
    "import": (cmd_import, "a GGUF file (gguf_import.file: a path or pkg:<pip package>) -> a Hugging Face checkpoint"),
    "report": (cmd_report, "table + plots comparing finished runs: distill-dist report RUN_DIR... [key=value]"),
    "make-tiny": (cmd_make_tiny, "write a randomly initialised tiny OLMo2/Llama (tests, benchmarks)"),
    "demo": (cmd_demo, "CPU demo: tiny OLMo2 teacher, prune, CE and KL recovery on 2 ranks (ZeRO-3), report"),
    "config": (cmd_config, "print the resolved, validated config as YAML (every key: docs/configuration.md)"),
}
DEMO_DEFAULTS = [
    "output_dir=runs/demo", "prune.schedule=[0.1]", "prune.overwrite=true", "eval.batch_size=64",
    "data.max_length=64", "train.max_steps=100", "train.micro_batch_size=16", "train.lr=1e-3", "train.warmup_steps=8",
    "train.save_every=50", "train.temperature=1.0",
    # the demo's own byte-level BPE is unknown to llama.cpp's converter; its pre-tokenizer is GPT-2's
    "export.pre_tokenizer=gpt-2", "eval.threads=[1]",
]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plan"]:  # its own options (GPUs, MFU, ...): see `distill-dist plan --help`
        from .plan import main as plan_main

        return plan_main(argv[1:])
    parser = argparse.ArgumentParser(prog="distill-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("plan", help="costed plan of the real run: parameters, FLOPs, memory per GPU, GPU-hours")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=config_epilog(name))
        p.add_argument("--config", "-c", help="YAML config file (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. prune.schedule=[0.5]")
        if name == "cache-teacher":
            p.add_argument("--shard", type=int, help="compute only this shard (Slurm array task id)")
            p.add_argument("--num-shards", type=int, help="total number of shards (the array size)")
            p.add_argument("--verify", action="store_true", help="re-hash every shard of a finished cache")
    args = parser.parse_args(_take_local_rank(argv))
    fn = COMMANDS[args.command][0]
    from .signals import EXIT_PREEMPTED, Preempted, ignore_further_notices, install_stop_handlers

    if args.command in ("train", "cache-teacher"):
        install_stop_handlers()
    quiet_third_party_warnings()
    library_bars_only_on_a_terminal()

    clean = False  # a rank-symmetric refusal, like a success, leaves the process group on every rank
    try:
        overrides = (DEMO_DEFAULTS if args.command == "demo" else []) + [o for o in args.overrides if "=" in o]
        positional = [o for o in args.overrides if "=" not in o]
        if positional and args.command != "report":
            raise ConfigError(f"unexpected argument '{positional[0]}': overrides are key=value")
        if positional:
            overrides.append("report.runs=[" + ",".join(json.dumps(p) for p in positional) + "]")
        if getattr(args, "shard", None) is not None:
            overrides.append(f"teacher.shard={args.shard}")
        if getattr(args, "num_shards", None) is not None:
            overrides.append(f"teacher.num_shards={args.num_shards}")
        cfg = load_config(args.config, overrides)
        fn(cfg, verify=True) if getattr(args, "verify", False) else fn(cfg)
        code = 0
        _write_done_marker(args.command)
    except UserError as e:
        print(f"distill-dist: error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", EXIT_USER_ERROR)
        clean = getattr(e, "symmetric", False)
    except Preempted:
        code = EXIT_PREEMPTED
        _write_stopped_marker()
    except KeyboardInterrupt:
        print("distill-dist: interrupted", file=sys.stderr)
        code = 130
    runtime = sys.modules.get("distill_dist.runtime")  # never imported (torch and all) just to shut down
    if runtime is not None:
        runtime.shutdown(clean=clean or code in (0, EXIT_PREEMPTED))
    if args.command in ("train", "cache-teacher"):
        ignore_further_notices()
    return code


def config_epilog(command: str) -> str:
    """Where a command's keys are described: the sections it reads, the reference page, `distill-dist config`."""
    reads = [key for key, readers in READ_BY.items() if command in readers]
    return (f"Config keys it reads: {', '.join(reads)} (see docs/configuration.md for every key's type, default, "
            f"allowed values and meaning). `distill-dist config [-c FILE] [key=value ...]` prints the resolved "
            f"config." if command != "config" else
            "Reads every section; every key's type, default, allowed values and meaning: docs/configuration.md.")


def quiet_third_party_warnings() -> None:
    """DeepSpeed's collectives emit a torch FutureWarning per call (thousands of lines per run), and
    transformers/torch repeat known deprecations; our own warnings stay visible."""
    import warnings

    for module in ("deepspeed", "torch", "transformers", "accelerate"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    warnings.filterwarnings("ignore", message="OMP_NUM_THREADS/MKL_NUM_THREADS unset")  # accelerate, per rank


def _take_local_rank(argv: list[str]) -> list[str]:
    """The DeepSpeed launcher appends --local_rank=N to the program's arguments; move it to LOCAL_RANK."""
    import os

    out, it = [], iter(argv)
    for a in it:
        if a.startswith(("--local_rank", "--local-rank")):
            os.environ["LOCAL_RANK"] = a.split("=", 1)[1] if "=" in a else next(it)
        else:
            out.append(a)
    return out


def _write_done_marker(command: str) -> None:
    """$DISTILL_DIST_DONE_FILE, written by rank 0 once the command has fully succeeded: batch scripts judge
    success by it, not by an exit status that a crash in interpreter teardown could still spoil."""
    import time

    path = os.environ.get("DISTILL_DIST_DONE_FILE")
    if not path:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    from .fileio import atomic_write_json

    atomic_write_json(path, {"command": command, "finished_unix": int(time.time())})


def _write_stopped_marker() -> None:
    """$DISTILL_DIST_STEP_STATE.stopped.<rank>, written by every rank once its checkpoint is complete, before
    exit 75: slurm/common.sh requeues on it. Written here, not by the launcher after the exit: on a loaded
    node srun can terminate the launcher (its step had a task exit 75) before it records anything."""
    state = os.environ.get("DISTILL_DIST_STEP_STATE")
    if state:
        Path(f"{state}.stopped.{os.environ.get('RANK', '0')}").touch()


if __name__ == "__main__":  # how torchrun / srun start every rank
    from .signals import EXIT_PREEMPTED

    exit_code = main()
    if exit_code not in (0, EXIT_PREEMPTED):
        # After an error, gloo's worker threads can still be alive at interpreter teardown and abort the
        # process ("terminate called without an active exception", pytorch/pytorch#190489), replacing the
        # status the error line announced. Everything is written and printed by now: leave without teardown.
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
