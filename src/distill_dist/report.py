"""Compare recovery runs: a Markdown/CSV table and PNG plots, refusing unfair comparisons.

Runs are grouped by (keep ratio, training examples). Within a group every run must start from the
same pruning (plan hash) under the same schedule (steps, batch, LR, seed, data), or the comparison
is refused: a CE-vs-KL gap is only meaningful when nothing but the loss differs.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .errors import UserError
from .evaluate import ECE_BINS, confidence_bins
from .fileio import atomic_write_bytes, atomic_write_text

COLUMNS = ["arm", "loss", "keep_ratio", "params_retained", "train_examples", "acc", "nll", "ece", "entropy",
           "delta_vs_teacher", "delta_kl_minus_ce", "teacher_source", "plan_sha256", "run"]


class ReportError(UserError):
    pass


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    done = run_dir / "done.json"
    if not done.is_file():
        raise ReportError(f"{run_dir}: no done.json (the run has not finished)")
    d = json.loads(done.read_text())
    if "eval" not in d or d["eval"] is None:
        raise ReportError(f"{run_dir}: the run was not evaluated (train.eval_after=false); run `distill-dist eval`")
    d["run_dir"] = str(run_dir)
    return d


def check_comparable(runs: list[dict]) -> None:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["keep_ratio"], r["schedule"]["train_examples"]), []).append(r)
    for (ratio, n), members in groups.items():
        first = members[0]
        for other in members[1:]:
            for key in ("plan_sha256", "schedule", "data", "prune"):
                if other[key] != first[key]:
                    raise ReportError(
                        f"refusing to compare {first['run_dir']} and {other['run_dir']} (keep {ratio}, {n} examples): "
                        f"their {key} differ ({_short(first[key])} vs {_short(other[key])})")


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def build_rows(runs: list[dict], teacher_eval: dict | None) -> list[dict]:
    teacher_acc = teacher_eval["metrics"]["acc"] if teacher_eval else None
    rows = []
    for r in sorted(runs, key=lambda r: (-r["keep_ratio"], r["schedule"]["train_examples"], r["arm"])):
        m = r["eval"]
        rows.append({
            "arm": r["arm"], "loss": r["loss"]["kind"], "keep_ratio": r["keep_ratio"],
            "params_retained": r["params_after"] / r["params_before"], "train_examples": r["schedule"]["train_examples"],
            "acc": m["acc"], "nll": m["nll"], "ece": m["ece"], "entropy": m["entropy"],
            "delta_vs_teacher": None if teacher_acc is None else m["acc"] - teacher_acc,
            "delta_kl_minus_ce": None, "teacher_source": r["teacher"]["source"],
            "plan_sha256": r["plan_sha256"][:12], "run": r["run_dir"],
        })
    for row in rows:
        if row["arm"] == "kl":
            ce = [c for c in rows if c["arm"] == "ce" and c["keep_ratio"] == row["keep_ratio"]
                  and c["train_examples"] == row["train_examples"]]
            if ce:
                row["delta_kl_minus_ce"] = row["acc"] - ce[0]["acc"]
    return rows


def _fmt(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}"
    return str(v)


def to_markdown(rows: list[dict], teacher_eval: dict | None, pruned_eval: dict | None = None) -> str:
    cols = COLUMNS[:-1]
    out = []
    for name, ev in (("Unpruned teacher", teacher_eval), ("Pruned, before recovery", pruned_eval)):
        if ev:
            t = ev["metrics"]
            out.append(f"{name}: acc {t['acc']:.3f}, nll {t['nll']:.3f}, ece {t['ece']:.3f}, "
                       f"entropy {t['entropy']:.3f} ({ev['model']['params']:,} params)")
    if out:
        out.append("")
    out.append("| " + " | ".join(cols) + " |")
    out.append("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if c.startswith("delta") and v is not None:
                cells.append(f"{v:+.3f}")
            elif c == "params_retained":
                cells.append(f"{v:.1%}")
            else:
                cells.append(_fmt(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _reliability(examples_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = [json.loads(l) for l in examples_path.read_text().splitlines() if l.strip()]
    rows = [r for r in rows if r["gold"] is not None]
    conf = np.array([max(r["probs"]) for r in rows])
    correct = np.array([r["pred"] == r["gold"] for r in rows], dtype=float)
    bins = confidence_bins(conf)
    centers, accs, counts = [], [], []
    for b in range(ECE_BINS):
        sel = bins == b
        if sel.any():
            centers.append(conf[sel].mean()), accs.append(correct[sel].mean()), counts.append(sel.sum())
    return np.array(centers), np.array(accs), np.array(counts)


def plot(rows: list[dict], runs: list[dict], teacher_eval: dict | None, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for arm, style in (("ce", "o-"), ("kl", "s-")):
        sizes = sorted({r["train_examples"] for r in rows if r["arm"] == arm})
        for n in sizes:
            pts = sorted((r["keep_ratio"], r["acc"]) for r in rows if r["arm"] == arm and r["train_examples"] == n)
            if pts:
                ax.plot(*zip(*pts), style, label=f"{arm.upper()} ({n} examples)")
    if teacher_eval:
        ax.axhline(teacher_eval["metrics"]["acc"], color="gray", ls="--", label="unpruned teacher")
    ax.axhline(0.2, color="lightgray", ls=":", label="chance")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("MLP keep ratio")
    ax.set_ylabel("CSQA accuracy")
    ax.legend(fontsize=8)
    ax.set_title("Accuracy after recovery")
    fig.tight_layout()
    paths.append(_save_fig(fig, out_dir / "accuracy_vs_keep_ratio.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1)
    for r in runs:
        ex = Path(r["run_dir"]) / "eval" / "examples.jsonl"
        if ex.is_file():
            c, a, _ = _reliability(ex)
            ax.plot(c, a, "o-", ms=3, label=f"{r['arm'].upper()} keep {r['keep_ratio']} (ECE {r['eval']['ece']:.3f})")
    ax.set_xlabel("confidence (max probability over A-E)")
    ax.set_ylabel("accuracy")
    ax.set_title("Calibration")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(_save_fig(fig, out_dir / "calibration.png"))
    plt.close(fig)
    return paths


def _save_fig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _load_eval(path: str | None, field_name: str) -> dict | None:
    if not path:
        return None
    p = Path(path)
    p = p / "eval.json" if p.is_dir() else p
    if not p.is_file():
        raise ReportError(f"config field '{field_name}': no such file '{p}'")
    return json.loads(p.read_text())


def make_report(run_dirs: list[str], out_dir: str | Path, teacher_eval_path: str | None = None,
                pruned_eval_path: str | None = None) -> tuple[str, list[dict]]:
    if not run_dirs:
        raise ReportError("no runs given: distill-dist report RUN_DIR [RUN_DIR ...]")
    runs = [load_run(d) for d in run_dirs]
    check_comparable(runs)
    teacher_eval = _load_eval(teacher_eval_path, "report.teacher_eval")
    pruned_eval = _load_eval(pruned_eval_path, "report.pruned_eval")
    rows = build_rows(runs, teacher_eval)
    out_dir = Path(out_dir)
    md = to_markdown(rows, teacher_eval, pruned_eval)
    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.csv", to_csv(rows))
    plot(rows, runs, teacher_eval, out_dir)
    return md, rows
