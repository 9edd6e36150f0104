"""The report: table values from run records, and refusal of unfair comparisons."""
import json

import pytest

from distill_dist import cli
from distill_dist.report import ReportError, make_report


def _run(tmp_path, name, arm, acc, plan="a" * 64, keep=0.5, steps=100, examples=9741):
    d = tmp_path / name
    d.mkdir()
    record = {
        "arm": arm, "loss": {"kind": arm, "positions": "answer"}, "plan_sha256": plan, "keep_ratio": keep,
        "params_before": 1000, "params_after": 700, "prune": {"schedule": [keep], "mode": "one_shot", "score": "gate_up_down"},
        "teacher": {"source": "live" if arm == "kl" else "none"},
        "schedule": {"max_steps": steps, "global_batch": 32, "lr": 1e-4, "warmup_steps": 10, "min_lr_ratio": 0.1,
                     "weight_decay": 0.0, "grad_clip": 1.0, "seed": 0, "train_examples": examples},
        "data": {"source": "jsonl", "path": "x", "train_examples": None, "seed": 1, "max_length": 512, "prompt_version": "v"},
        "eval": {"acc": acc, "nll": 1.2, "ece": 0.05, "entropy": 1.0},
    }
    (d / "done.json").write_text(json.dumps(record))
    return d


def test_table_has_deltas_and_plots(tmp_path):
    ce, kl = _run(tmp_path, "ce", "ce", 0.50), _run(tmp_path, "kl", "kl", 0.56)
    teacher = tmp_path / "teacher_eval.json"
    teacher.write_text(json.dumps({"metrics": {"acc": 0.60, "nll": 1.0, "ece": 0.02, "entropy": 0.9},
                                   "model": {"params": 1000}}))
    md, rows = make_report([str(ce), str(kl)], tmp_path / "out", str(teacher))
    by_arm = {r["arm"]: r for r in rows}
    assert by_arm["kl"]["delta_kl_minus_ce"] == pytest.approx(0.06)
    assert by_arm["ce"]["delta_vs_teacher"] == pytest.approx(-0.10)
    assert by_arm["kl"]["params_retained"] == pytest.approx(0.7)
    assert "+0.060" in md and "-0.100" in md
    for f in ("report.md", "report.csv", "accuracy_vs_keep_ratio.png", "calibration.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert (tmp_path / "out" / "accuracy_vs_keep_ratio.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("field,change", [("plan_sha256", "b" * 64), ("schedule.lr", 3e-4), ("schedule.seed", 7),
                                          ("data.seed", 2)])
def test_mismatched_runs_are_refused(tmp_path, capsys, field, change):
    ce, kl = _run(tmp_path, "ce", "ce", 0.5), _run(tmp_path, "kl", "kl", 0.6)
    rec = json.loads((kl / "done.json").read_text())
    node, *rest = field.split(".")
    if rest:
        rec[node][rest[0]] = change
    else:
        rec[node] = change
    (kl / "done.json").write_text(json.dumps(rec))
    with pytest.raises(ReportError, match=f"their {node} differ"):
        make_report([str(ce), str(kl)], tmp_path / "out")
    assert cli.main(["report", str(ce), str(kl), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "refusing to compare" in err and len([l for l in err.splitlines() if l]) == 1


def test_runs_at_different_keep_ratios_or_sizes_are_separate_groups(tmp_path):
    runs = [_run(tmp_path, "ce5", "ce", 0.5, plan="a" * 64), _run(tmp_path, "kl5", "kl", 0.55, plan="a" * 64),
            _run(tmp_path, "ce3", "ce", 0.3, plan="c" * 64, keep=0.3),
            _run(tmp_path, "kl3", "kl", 0.4, plan="c" * 64, keep=0.3)]
    _, rows = make_report([str(r) for r in runs], tmp_path / "out")
    deltas = {(r["keep_ratio"], r["arm"]): r["delta_kl_minus_ce"] for r in rows}
    assert deltas[(0.5, "kl")] == pytest.approx(0.05) and deltas[(0.3, "kl")] == pytest.approx(0.1)


def test_unfinished_run_is_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ReportError, match="has not finished"):
        make_report([str(tmp_path / "half")], tmp_path / "out")
