"""`distill-dist <command> [--config FILE.yaml] [key=value ...]`: one entry point for every stage.

Bad input ends in one line on stderr (`distill-dist: error: ...`) and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import RunConfig, load_config, require_local_or_hub, to_yaml
from .errors import ConfigError, UserError
from .fileio import atomic_write_text, checkpoint_fingerprint, dir_bytes

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
    if cfg.prune.mode == "one_shot" and len(cfg.prune.schedule) != 1:
        raise ConfigError(f"config field 'prune.schedule' = {cfg.prune.schedule}: one_shot takes one keep ratio; "
                          "use prune.mode=iterative for a schedule")
    # Iterative schedules start from the first ratio; recovery prunes further between stages.
    ratio = cfg.prune.schedule[0] if cfg.prune.mode == "iterative" else cfg.prune.keep_ratio
    tok = load_tokenizer(cfg.model.tokenizer) if cfg.model.tokenizer else None
    plan = prune_checkpoint(cfg.model.path, cfg.prune.output_dir, ratio, cfg.prune.score, cfg.prune.round_to,
                            cfg.prune.max_shard_mb, tokenizer=tok, overwrite=cfg.prune.overwrite)
    _save_config(cfg, Path(cfg.prune.output_dir), "distill_dist_prune.yaml")
    return plan


# ---------------------------------------------------------------- eval

def cmd_eval(cfg: RunConfig) -> dict | None:
    from .data import load_split
    from .distributed import maybe_init_distributed, pick_device
    from .evaluate import evaluate, write_eval
    from .models import load_causal_lm, load_tokenizer

    model_path = cfg.eval.model or cfg.model.path
    require_local_or_hub(model_path, "eval.model" if cfg.eval.model else "model.path")
    rank, world_size, local_rank = maybe_init_distributed()
    device = pick_device(cfg.eval.device, local_rank)
    tok = load_tokenizer(cfg.model.tokenizer or model_path)
    ds = load_split(cfg.data, cfg.eval.split)
    if cfg.eval.limit:
        ds = ds.select(range(min(cfg.eval.limit, len(ds))))
    model = load_causal_lm(model_path, cfg.model.dtype, device)
    t0 = time.time()
    metrics, per_example = evaluate(model, tok, ds, cfg.eval.batch_size, cfg.data.max_length, device,
                                    cfg.data.add_bos)
    wall = time.time() - t0
    if rank != 0:
        return None
    local = Path(model_path).is_dir()
    meta = {
        "split": cfg.eval.split,
        "data": {"source": cfg.data.source, "path": cfg.data.path},
        "model": {
            "path": model_path,
            "fingerprint": checkpoint_fingerprint(model_path) if local else None,
            "params": sum(p.numel() for p in model.parameters()),
            "bytes_on_disk": dir_bytes(model_path) if local else None,
            "intermediate_size": model.config.intermediate_size,
            "pruning_plan_sha256": _plan_sha(model_path),
        },
        "world_size": world_size,
        "device": str(device),
        "wall_s": wall,
    }
    out_dir = Path(cfg.eval.output_dir or Path(cfg.output_dir) / "eval" / Path(model_path).name)
    out = write_eval(out_dir, metrics, per_example, meta)
    _save_config(cfg, out_dir, "config.yaml")
    m = metrics
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
    print(f"{cfg.eval.split}: n={m['n']} acc={fmt(m['acc'])} nll={fmt(m['nll'])} brier={fmt(m['brier'])} "
          f"ece={fmt(m['ece'])} entropy={fmt(m['entropy'])} ({wall:.1f}s) -> {out}")
    return {"metrics": metrics, **meta}


def _plan_sha(path: str) -> str | None:
    p = Path(path) / "pruning_plan.json"
    return json.loads(p.read_text()).get("plan_sha256") if p.is_file() else None


# ---------------------------------------------------------------- train

def cmd_train(cfg: RunConfig) -> dict | None:
    from .train import run_training

    return run_training(cfg)


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


# ---------------------------------------------------------------- demo

def cmd_demo(cfg: RunConfig) -> list[dict]:
    """The CPU demo: synthetic CSQA-format data, a tiny OLMo2, prune, evaluate before and after."""
    from dataclasses import replace

    from .models import build_tiny_model
    from .synthetic import train_tokenizer, write_synthetic_csqa

    root = Path(cfg.output_dir)
    data_dir = write_synthetic_csqa(root / "data")
    tok = train_tokenizer(data_dir)
    teacher_dir = root / "teacher"
    model = build_tiny_model(cfg.tiny, tok)
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    cfg = replace(cfg, model=replace(cfg.model, path=str(teacher_dir), tokenizer=None),
                  data=replace(cfg.data, source="jsonl", path=str(data_dir)))
    plan = cmd_prune(cfg)
    results = []
    for name, path in (("teacher", teacher_dir), ("pruned", Path(cfg.prune.output_dir))):
        ecfg = replace(cfg, eval=replace(cfg.eval, model=str(path), output_dir=str(root / "eval" / name)))
        r = cmd_eval(ecfg)
        results.append({"name": name, **r})
    print()
    print("| model | keep ratio | params | acc | nll | ece | entropy |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        m = r["metrics"]
        ratio = 1.0 if r["name"] == "teacher" else plan["keep_ratio"]
        print(f"| {r['name']} | {ratio:.2f} | {r['model']['params']:,} | {m['acc']:.3f} | {m['nll']:.3f} | "
              f"{m['ece']:.3f} | {m['entropy']:.3f} |")
    return results


COMMANDS = {
    "prune": (cmd_prune, "structured L2 pruning of MLP neurons -> a smaller standard checkpoint"),
    "eval": (cmd_eval, "CommonsenseQA accuracy and calibration (runs under torchrun for sharded eval)"),
    "train": (cmd_train, "recover the pruned student: train.arm=ce (labels) or kl (teacher); torchrun for ZeRO-3"),
    "make-tiny": (cmd_make_tiny, "write a randomly initialised tiny OLMo2/Llama (tests, benchmarks)"),
    "demo": (cmd_demo, "CPU demo on a synthetic task: tiny model, prune, evaluate"),
}
DEMO_DEFAULTS = ["output_dir=runs/demo", "prune.schedule=[0.25]", "prune.overwrite=true", "eval.batch_size=32", "data.max_length=128"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distill-dist", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", "-c", help="YAML config file (configs/*.yaml)")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. prune.schedule=[0.5]")
    args = parser.parse_args(argv)
    fn = COMMANDS[args.command][0]
    from .train import EXIT_PREEMPTED, Preempted

    try:
        overrides = (DEMO_DEFAULTS if args.command == "demo" else []) + list(args.overrides)
        cfg = load_config(args.config, overrides)
        fn(cfg)
        code = 0
    except UserError as e:
        print(f"distill-dist: error: {e}", file=sys.stderr)
        code = getattr(e, "exit_code", EXIT_USER_ERROR)
    except Preempted:
        code = EXIT_PREEMPTED
    except KeyboardInterrupt:
        print("distill-dist: interrupted", file=sys.stderr)
        code = 130
    _shutdown_process_group(clean=code == 0)
    return code


def _shutdown_process_group(clean: bool) -> None:
    """Leave the process group explicitly: exiting with it alive can abort in its destructor."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
