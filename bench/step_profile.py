"""Profile: one recovery step on one rank, broken into its phases, from the product's own training loop.

    python bench/step_profile.py -c configs/gemma3_270m_cloze_cpu.yaml --arm ce [--steps 3] [key=value ...]

Runs `RecoveryRecipe` (setup, then its `train()` loop) in this process for 1 warm-up + --steps steps
and times (wall and process CPU time: on a loaded machine CPU time is the steadier figure), per step,
with wrappers around the engine's own calls:

  teacher      the live teacher's forward (KL arm)
  body fwd     the student's forward minus the loss head (ZeRO-3's gather/release hooks included)
  head/loss    the fused loss through the LM head (its forward forms the head's gradients too)
  backward     engine.backward (ZeRO-3's reduce hooks and gradient copies included)
  optimizer    the torch optimizer's step
  engine step  engine.step minus the optimizer (clipping, ZeRO-3's flatten/partition bookkeeping)
  rest         the step's wall time minus the above (collate, the loss all-reduce, logging)

Each phase also gets its minor page faults (memory freshly mapped by the kernel), as GB of 4 KiB pages.
Peak RSS is VmHWM, reset after setup so the training peak is separate from the loading peak.
Prints a markdown table and one JSON line; the figures are means over the measured steps.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PHASES = ("teacher", "body fwd", "head/loss", "backward", "optimizer", "engine step", "rest")


class Phases:
    """Wall seconds and minor page faults per phase, accumulated by wrapped callables."""

    def __init__(self):
        self.sec, self.cpu, self.faults = defaultdict(float), defaultdict(float), defaultdict(int)

    def wrap(self, obj, attr: str, name: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0, c0, f0 = time.perf_counter(), time.process_time(), _minflt()
            try:
                return inner(*args, **kwargs)
            finally:
                self.sec[name] += time.perf_counter() - t0
                self.cpu[name] += time.process_time() - c0
                self.faults[name] += _minflt() - f0

        setattr(obj, attr, timed)

    def snapshot(self) -> dict:
        return {"sec": dict(self.sec), "cpu": dict(self.cpu), "faults": dict(self.faults), "minflt": _minflt(),
                "cpu_total": time.process_time()}


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def _instrument(recipe, phases: Phases, steps: list) -> None:
    engine = recipe.engine
    if recipe.teacher is not None and hasattr(recipe.teacher, "model"):
        phases.wrap(recipe.teacher.model, "forward", "teacher")
    phases.wrap(engine, "forward", "fwd+head")
    phases.wrap(engine.module.loss_head, "forward", "head/loss")
    phases.wrap(engine, "backward", "backward")
    phases.wrap(engine, "step", "step+opt")
    opt = engine.optimizer
    phases.wrap(getattr(opt, "optimizer", opt), "step", "optimizer")
    log = recipe._log

    def logged(step, loss, lr, tokens, dt, bar):
        steps.append({"step": step, "loss": loss, "wall": dt, **phases.snapshot()})
        return log(step, loss, lr, tokens, dt, bar)

    recipe._log = logged


def _per_step(steps: list, warmup: int) -> dict:
    """Mean wall seconds, CPU seconds and fault-GB per phase over the steps after the warm-up."""
    first, last, n = steps[warmup - 1], steps[-1], len(steps) - warmup

    def split(kind: str, step_total: float) -> dict:
        d = lambda k: (last[kind].get(k, 0) - first[kind].get(k, 0)) / n  # noqa: E731
        out = {k: d(k) for k in ("teacher", "head/loss", "backward", "optimizer")}
        out["body fwd"] = d("fwd+head") - out["head/loss"]
        out["engine step"] = d("step+opt") - out["optimizer"]
        out["rest"] = step_total - sum(out.values())
        return out

    wall = sum(s["wall"] for s in steps[warmup:]) / n
    cpu, faults = ((last[k] - first[k]) / n for k in ("cpu_total", "minflt"))
    return {"wall_s": wall, "cpu_s": cpu, "fault_gb_total": faults * 4096 / 1e9, "sec": split("sec", wall),
            "cpu": split("cpu", cpu), "fault_gb": {k: v * 4096 / 1e9 for k, v in split("faults", faults).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--config", required=True)
    ap.add_argument("--arm", choices=("ce", "kl"), default="ce")
    ap.add_argument("--steps", type=int, default=3, help="measured steps, after 1 warm-up step")
    ap.add_argument("--label", default="", help="a name for this configuration in the output")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_intermixed_args()
    import torch

    from distill_dist.config import load_config
    from distill_dist.recipe import RecoveryRecipe

    out = Path(tempfile.mkdtemp(prefix="dd_profile_"))
    cfg = load_config(a.config, [*a.overrides, f"train.arm={a.arm}", f"train.max_steps={a.steps + 1}",
                                 f"train.output_dir={out}", "train.save_every=0", "train.eval_after=false"])
    recipe = RecoveryRecipe(cfg)
    phases, steps = Phases(), []
    try:
        t0 = time.time()
        recipe.setup()
        setup_s, setup_peak = time.time() - t0, _status_bytes("VmHWM")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        _instrument(recipe, phases, steps)
        recipe.train()
    finally:
        recipe.close()
        shutil.rmtree(out, ignore_errors=True)
    prof = _per_step(steps, warmup=1)
    result = {"label": a.label, "arm": a.arm, "threads": torch.get_num_threads(), "setup_s": round(setup_s, 1),
              "setup_peak_rss_gb": round(setup_peak / 1e9, 2), "train_peak_rss_gb": round(_status_bytes("VmHWM") / 1e9, 2),
              "losses": [s["loss"] for s in steps], **prof}
    print(f"\n{a.label or a.arm}: {a.arm} step, mean of {a.steps} after 1 warm-up, {torch.get_num_threads()} threads; "
          f"peak RSS training {result['train_peak_rss_gb']} GB (setup {result['setup_peak_rss_gb']} GB)")
    print("| phase | wall s/step | CPU s/step | page faults (GB/step) |\n|---|---|---|---|")
    for k in PHASES:
        if k != "teacher" or a.arm == "kl":
            print(f"| {k} | {prof['sec'][k]:.2f} | {prof['cpu'][k]:.2f} | {prof['fault_gb'][k]:.2f} |")
    print(f"| **step** | **{prof['wall_s']:.2f}** | **{prof['cpu_s']:.2f}** | **{prof['fault_gb_total']:.2f}** |")
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
