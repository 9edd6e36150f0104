"""The report: per-group tables over seeds, paired statistics that match stats.py, refusals, plots.

Runs are fake directories on disk (done.json + eval/) with known per-question correctness; no training.
"""
import csv
import json
import math
import zlib

import numpy as np
import pytest

from distill_dist import cli, stats
from distill_dist.data import LABELS
from distill_dist.evaluate import metrics_from_logliks
from distill_dist.report import PLOTS, ReportError, make_report

N_Q = 200


def _probs(correct: np.ndarray, conf: np.ndarray) -> np.ndarray:
    """[Q, 5]: the predicted letter gets `conf` (gold if correct, else the next letter), the rest share."""
    q = len(correct)
    gold = np.arange(q) % 5
    pred = np.where(correct, gold, (gold + 1) % 5)
    p = np.tile(((1 - conf) / 4)[:, None], (1, 5))
    p[np.arange(q), pred] = conf
    return p


def _pattern(acc: float, seed: int, q: int = N_Q) -> tuple[np.ndarray, np.ndarray]:
    """Correctness with exactly round(acc * q) right answers, and confidences in [0.3, 0.95]."""
    rng = np.random.default_rng(seed)
    correct = np.zeros(q, bool)
    correct[rng.permutation(q)[: round(acc * q)]] = True
    return correct, rng.uniform(0.3, 0.95, q)


def _write_eval(d, probs: np.ndarray, split="validation", ids=None, params=700):
    """eval/eval.json + examples.jsonl as the evaluator writes them; returns the metrics."""
    ids = ids or [f"q{i:04d}" for i in range(len(probs))]
    gold = np.arange(len(probs)) % 5
    logliks = np.log(probs)
    metrics, _ = metrics_from_logliks(logliks, gold)
    d.mkdir(parents=True)
    rows = [{"id": i, "logliks": ll.tolist(), "probs": p.tolist(), "pred": LABELS[int(ll.argmax())],
             "gold": LABELS[g]} for i, ll, p, g in zip(ids, logliks, probs, gold)]
    (d / "examples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.json").write_text(json.dumps({"metrics": metrics, "split": split, "model": {"params": params}}))
    return metrics


def _run(tmp_path, name, arm, seed=0, acc=0.5, pattern=None, keep=0.5, examples=1000, plan="a" * 64, **eval_kw):
    """A finished run dir; `pattern` = (correct, conf) overrides the random pattern of accuracy `acc`."""
    d = tmp_path / name
    correct, conf = pattern if pattern is not None else _pattern(acc, zlib.crc32(f"{name}/{seed}".encode()))
    metrics = _write_eval(d / "eval", _probs(correct, conf), **eval_kw)
    record = {
        "arm": arm, "loss": {"kind": arm, "temperature": 1.0, "jsd_beta": 0.5, "alpha": 0.5, "positions": "answer"},
        "plan_sha256": plan, "keep_ratio": keep, "params_before": 1000, "params_after": 700,
        "prune": {"schedule": [keep], "mode": "one_shot", "score": "gate_up_down"},
        "teacher": {"source": "live" if arm == "kl" else "none"},
        "schedule": {"max_steps": 100, "global_batch": 32, "lr": 1e-4, "warmup_steps": 10, "min_lr_ratio": 0.1,
                     "weight_decay": 0.0, "grad_clip": 1.0, "seed": seed, "train_examples": examples},
        "data": {"source": "jsonl", "path": "x", "train_examples": None, "seed": 1, "max_length": 512,
                 "prompt_version": "v"},
        "eval": metrics,
    }
    (d / "done.json").write_text(json.dumps(record))
    return d


def _edit(run_dir, field, value):
    rec = json.loads((run_dir / "done.json").read_text())
    node, *rest = field.split(".")
    if rest:
        rec[node][rest[0]] = value
    else:
        rec[node] = value
    (run_dir / "done.json").write_text(json.dumps(rec))


def _csv(out):
    return list(csv.DictReader((out / "report.csv").open()))


def _pq(run_dirs):
    """stats.PerQuestion of runs straight from their examples.jsonl (independent of report.py's loader)."""
    rows = [[json.loads(l) for l in (d / "eval" / "examples.jsonl").read_text().splitlines()] for d in run_dirs]
    probs = np.array([[r["probs"] for r in rr] for rr in rows])
    return stats.PerQuestion.from_probs(probs, np.array([LABELS.index(r["gold"]) for r in rows[0]]))


def test_table_means_and_sds_over_seeds(tmp_path):
    accs = {("ce", 0): 0.50, ("ce", 1): 0.56, ("ce", 2): 0.53, ("kl", 0): 0.60, ("kl", 1): 0.62, ("kl", 2): 0.65}
    dirs = [_run(tmp_path, f"{a}{s}", a, s, acc) for (a, s), acc in accs.items()]
    md, rows = make_report([str(d) for d in dirs], tmp_path / "out")
    for arm in ("ce", "kl"):
        vals = [accs[(arm, s)] for s in range(3)]
        row = next(r for r in rows if r["row_type"] == "model" and r["name"] == arm)
        assert row["acc_mean"] == pytest.approx(np.mean(vals), abs=1e-12)
        assert row["acc_sd"] == pytest.approx(np.std(vals, ddof=1), abs=1e-12)
        assert row["seeds"] == "0;1;2"
        assert f"| {arm.upper()} | 0, 1, 2 | 70.0% | {np.mean(vals):.3f} ± {np.std(vals, ddof=1):.3f} |" in md
    nll = [json.loads((d / "done.json").read_text())["eval"]["nll"] for d in dirs[:3]]
    assert next(r for r in rows if r["name"] == "ce")["nll_sd"] == pytest.approx(np.std(nll, ddof=1), abs=1e-12)


def test_csv_statistics_equal_stats_module(tmp_path):
    ce = [_run(tmp_path, f"ce{s}", "ce", s, 0.55) for s in (0, 1)]
    kl = [_run(tmp_path, f"kl{s}", "kl", s, 0.62) for s in (1, 0)]  # given out of seed order: paired by seed value
    teacher = tmp_path / "teacher"
    _write_eval(teacher, _probs(*_pattern(0.8, 9)), params=1000)
    make_report([str(d) for d in ce + kl], tmp_path / "out", str(teacher))
    rows = _csv(tmp_path / "out")
    a, b = _pq([kl[1], kl[0]]), _pq(ce)
    t = stats.PerQuestion.from_probs(_probs(*_pattern(0.8, 9))[None], np.arange(N_Q) % 5)
    for name, x, y in (("kl-ce", a, b), ("kl-teacher", a, t), ("ce-teacher", b, t)):
        expect = stats.bootstrap(x, y)
        row = next(r for r in rows if r["row_type"] == "comparison" and r["name"] == name)
        for m in ("acc", "nll", "ece"):
            got = [float(row[f"{m}_{k}"]) for k in ("mean", "low", "high")]
            assert got == [expect[m].estimate, expect[m].low, expect[m].high], (name, m)
        tests = stats.mcnemar_per_pair(x, y)
        got = [(int(r["mcnemar_seed"]), int(r["mcnemar_b"]), int(r["mcnemar_c"]), float(r["mcnemar_p"]))
               for r in rows if r["row_type"] == "mcnemar" and r["name"] == name]
        assert got == [(s, m.b, m.c, m.p) for s, m in zip((0, 1), tests)]
    assert any(float(r["mcnemar_p"]) < 1 for r in rows if r["row_type"] == "mcnemar")


@pytest.mark.parametrize("field,change", [
    ("plan_sha256", "b" * 64), ("schedule.lr", 3e-4), ("schedule.max_steps", 50), ("data.seed", 2),
    ("data.max_length", 256), ("prune.mode", "iterative"), ("loss.positions", "all"), ("loss.temperature", 2.0)])
def test_unfair_groups_are_refused_naming_the_field(tmp_path, field, change):
    ce, kl = _run(tmp_path, "ce", "ce"), _run(tmp_path, "kl", "kl")
    _edit(kl, field, change)
    with pytest.raises(ReportError, match=f"their {field} differ") as e:
        make_report([str(ce), str(kl)], tmp_path / "out")
    assert str(ce) in str(e.value) and str(kl) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_prints_a_refusal_as_one_line(tmp_path, capsys):
    ce, kl = _run(tmp_path, "ce", "ce"), _run(tmp_path, "kl", "kl")
    _edit(kl, "loss.temperature", 2.0)
    assert cli.main(["report", str(ce), str(kl), f"output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "their loss.temperature differ" in err and len([l for l in err.splitlines() if l]) == 1


def test_eval_split_and_question_set_mismatches_are_refused(tmp_path):
    ce = _run(tmp_path, "ce", "ce")
    with pytest.raises(ReportError, match="their eval.split differ"):
        make_report([str(ce), str(_run(tmp_path, "kl", "kl", split="train"))], tmp_path / "out")
    other_ids = [f"x{i}" for i in range(N_Q)]
    with pytest.raises(ReportError, match="different question sets"):
        make_report([str(ce), str(_run(tmp_path, "kl2", "kl", ids=other_ids))], tmp_path / "out")
    teacher = tmp_path / "teacher"
    _write_eval(teacher, _probs(*_pattern(0.8, 9))[:150])
    with pytest.raises(ReportError, match=r"different question sets \(200 vs 150"):
        make_report([str(ce)], tmp_path / "out", str(teacher))


def test_seed_is_not_a_fairness_field_but_a_duplicate_seed_is_refused(tmp_path):
    runs = [_run(tmp_path, "ce0", "ce", 0), _run(tmp_path, "ce1", "ce", 1), _run(tmp_path, "kl0", "kl", 0)]
    md, _ = make_report([str(r) for r in runs], tmp_path / "out")
    assert "note: KL − CE: paired on seeds 0 (KL has 0, CE has 0, 1)" in md
    dup = _run(tmp_path, "kl0b", "kl", 0)
    with pytest.raises(ReportError, match="two KL runs with schedule.seed 0"):
        make_report([str(r) for r in runs + [dup]], tmp_path / "out")


def _verdicts(md: str) -> list[str]:
    return [s for line in md.splitlines() if line.startswith("- ") and " = " in line for s in line[2:].split("; ")]


def test_verdict_states_a_sign_only_when_the_ci_excludes_zero(tmp_path):
    # Same number right, different questions: Δacc = 0 exactly; a 20-point gap in the other group.
    c0, k0 = _pattern(0.6, 1), _pattern(0.6, 2)
    runs = [_run(tmp_path, "ce_a", "ce", pattern=c0), _run(tmp_path, "kl_a", "kl", pattern=(k0[0], c0[1])),
            _run(tmp_path, "ce_b", "ce", acc=0.45, keep=0.3, plan="c" * 64),
            _run(tmp_path, "kl_b", "kl", acc=0.75, keep=0.3, plan="c" * 64)]
    md, rows = make_report([str(r) for r in runs], tmp_path / "out")
    comp = {r["keep_ratio"]: r for r in rows if r["row_type"] == "comparison"}
    assert comp[0.5]["acc_mean"] == 0 and comp[0.5]["acc_low"] < 0 < comp[0.5]["acc_high"]
    assert comp[0.3]["acc_low"] > 0
    sentences = _verdicts(md)
    assert "KL − CE = +0.0 pts [" in md and "KL − CE = +30.0 pts [" in md
    for s in sentences:
        lo, hi = (float(x.replace("\u2212", "-")) for x in s.split("[")[1].split("]")[0].split(", "))
        if lo <= 0 <= hi:
            assert "not significant" in s and "higher" not in s and "lower" not in s, s
        else:
            assert ("KL higher" if lo > 0 else "KL lower") in s and "significant at 0.05" in s, s
    assert any(s.startswith("KL − CE = +30.0 pts") and "KL higher, significant at 0.05" in s for s in sentences)


def test_single_seed_report_with_teacher_and_pruned(tmp_path):
    ce, kl = _run(tmp_path, "ce", "ce", acc=0.5), _run(tmp_path, "kl", "kl", acc=0.58)
    teacher, pruned = tmp_path / "eval" / "teacher", tmp_path / "eval" / "pruned"
    _write_eval(teacher, _probs(*_pattern(0.8, 3)), params=1000)
    _write_eval(pruned, _probs(*_pattern(0.3, 4)), params=700)  # no plan file: matched by parameter count
    md, rows = make_report([str(ce), str(kl)], tmp_path / "out", str(teacher), [str(pruned)])
    assert "| CE | 0 | 70.0% | 0.500 ± — |" in md and "| unpruned teacher | — | 100.0% | 0.800 |" in md
    names = [r["name"] for r in rows if r["row_type"] == "comparison"]
    assert names == ["kl-ce", "kl-pruned", "ce-pruned", "kl-teacher", "ce-teacher"]
    assert "one seed pair: the CIs cover question sampling only" in md
    assert "KL − pruned = +28.0 pts [" in md and "KL − teacher = −22.0 pts [" in md


def _as_cloze(eval_dir, raw_acc=0.123):
    """Recast an evaluation as data.format=cloze writes it: its pred/probs-based accuracy is the headline
    acc_per_char, and the unnormalised `acc` is some other number the report must not show."""
    ev = json.loads((eval_dir / "eval.json").read_text())
    m = ev["metrics"]
    m |= {"headline": "acc_per_char", "acc_per_char": m["acc"], "acc_per_token": 0.3, "acc": raw_acc}
    (eval_dir / "eval.json").write_text(json.dumps(ev))
    return m


def test_cloze_runs_are_judged_by_their_headline_accuracy(tmp_path):
    ce, kl = _run(tmp_path, "ce", "ce", acc=0.5), _run(tmp_path, "kl", "kl", acc=0.58)
    for d in (ce, kl):
        rec = json.loads((d / "done.json").read_text())
        rec["eval"] = _as_cloze(d / "eval")
        rec["data"]["format"] = "cloze"
        (d / "done.json").write_text(json.dumps(rec))
    teacher = tmp_path / "teacher"
    _write_eval(teacher, _probs(*_pattern(0.8, 3)), params=1000)
    with pytest.raises(ReportError, match=r"^refusing to compare .*ce and .*teacher: judged by different accuracies "
                                          r"\(acc_per_char vs acc: another data.format\)$"):
        make_report([str(ce), str(kl)], tmp_path / "out", str(teacher))
    _as_cloze(teacher)
    md, rows = make_report([str(ce), str(kl)], tmp_path / "out", str(teacher))
    assert "acc, Δacc: acc_per_char (log-likelihood per character of the continuation, OLMES)" in md
    assert "| CE | 0 | 70.0% | 0.500 ± — |" in md and "| unpruned teacher | — | 100.0% | 0.800 |" in md
    assert "0.123" not in md and "KL − CE = +8.0 pts [" in md
    assert {r["accuracy"] for r in rows} == {"acc_per_char"}
    assert next(r for r in rows if r["name"] == "kl")["acc_mean"] == 0.58
    # an mc run beside them: another data.format in the run record, refused
    mc = _run(tmp_path, "ce_mc", "ce", seed=1, acc=0.5)
    with pytest.raises(ReportError, match=r"their data.format differ"):
        make_report([str(ce), str(kl), str(mc)], tmp_path / "out")
    other = _run(tmp_path, "ce_mc_03", "ce", acc=0.5, keep=0.3, plan="c" * 64)  # another group: one plot, refused
    with pytest.raises(ReportError, match=r"judged by different accuracies \(acc_per_char vs acc"):
        make_report([str(ce), str(kl), str(other)], tmp_path / "out")


def test_pruned_eval_of_another_plan_is_not_compared(tmp_path):
    ce = _run(tmp_path, "ce", "ce")
    ckpt = tmp_path / "other_pruned"
    ckpt.mkdir()
    (ckpt / "pruning_plan.json").write_text(json.dumps({"plan_sha256": "f" * 64}))
    pruned = tmp_path / "eval_pruned"
    _write_eval(pruned, _probs(*_pattern(0.3, 4)), params=700)
    ev = json.loads((pruned / "eval.json").read_text())
    (pruned / "eval.json").write_text(json.dumps(ev | {"model": {"path": str(ckpt), "params": 700}}))
    md, rows = make_report([str(ce)], tmp_path / "out", pruned_eval_paths=[str(pruned)])
    assert "not the pruning these runs started from" in md
    assert not [r for r in rows if r["row_type"] == "comparison"]
    # the plan hash `distill-dist eval` records wins over the file beside the checkpoint
    (pruned / "eval.json").write_text(json.dumps(ev | {"model": {"path": str(ckpt), "pruning_plan_sha256": "a" * 64}}))
    _, rows = make_report([str(ce)], tmp_path / "out", pruned_eval_paths=[str(pruned)])
    assert [r["name"] for r in rows if r["row_type"] == "comparison"] == ["ce-pruned"]


def test_report_is_deterministic_and_plots_are_nontrivial(tmp_path):
    import matplotlib.image as mpimg

    runs = [_run(tmp_path, f"{a}{s}_{n}", a, s, acc=0.4 + 0.05 * s + (0.1 if a == "kl" else 0) + n / 40000,
                 examples=n) for a in ("ce", "kl") for s in (0, 1) for n in (500, 2000, 8000)]
    bytes_of = {}
    for out in ("out1", "out2"):
        make_report([str(r) for r in runs], tmp_path / out)
        bytes_of[out] = {f: (tmp_path / out / f).read_bytes() for f in ("report.md", "report.csv") + PLOTS}
    assert bytes_of["out1"] == bytes_of["out2"]
    for name in PLOTS:
        data = bytes_of["out1"][name]
        assert data[:4] == b"\x89PNG" and len(data) > 20_000, name
        img = mpimg.imread(tmp_path / "out1" / name)[..., :3]
        assert (img.min(-1) < 0.9).mean() > 0.02, f"{name} is almost blank"
    assert mpimg.imread(tmp_path / "out1" / "data_size.png").shape[1] > 900  # the 2x2 figure


def test_unfinished_or_unevaluated_runs_are_refused(tmp_path):
    (tmp_path / "half").mkdir()
    with pytest.raises(ReportError, match="has not finished"):
        make_report([str(tmp_path / "half")], tmp_path / "out")
    ce = _run(tmp_path, "ce", "ce")
    (ce / "eval" / "examples.jsonl").unlink()
    with pytest.raises(ReportError, match="examples.jsonl"):
        make_report([str(ce)], tmp_path / "out")


def test_mcnemar_in_csv_counts_the_discordant_questions(tmp_path):
    c_ce = np.zeros(N_Q, bool)
    c_kl = np.zeros(N_Q, bool)
    c_ce[:60], c_kl[:60] = True, True  # both right on 60
    c_kl[60:75] = True  # KL alone right on 15
    c_ce[75:80] = True  # CE alone right on 5
    conf = np.full(N_Q, 0.6)
    make_report([str(_run(tmp_path, "ce", "ce", pattern=(c_ce, conf))),
                 str(_run(tmp_path, "kl", "kl", pattern=(c_kl, conf)))], tmp_path / "out")
    row = next(r for r in _csv(tmp_path / "out") if r["row_type"] == "mcnemar")
    expected = 2 * sum(math.comb(20, k) for k in range(6)) / 2**20
    assert (int(row["mcnemar_b"]), int(row["mcnemar_c"])) == (15, 5)
    assert float(row["mcnemar_p"]) == pytest.approx(expected, rel=1e-12)


# ---------------------------------------------------------------- the score x loss study

def _score_run(tmp_path, score, arm, seed, acc, plan=None):
    d = _run(tmp_path, f"{score}_{arm}{seed}", arm, seed, acc=acc, plan=plan or score[0] * 64)
    _edit(d, "prune.score", score)
    return d


def test_scores_are_a_dimension_not_a_refusal(tmp_path):
    """Two scores x two arms x two seeds at one keep ratio: one group per score (each with its KL − CE), a
    score × arm table, and per arm taylor − gate_up_down paired by seed with stats.bootstrap's numbers."""
    accs = {("gate_up_down", "ce"): 0.40, ("gate_up_down", "kl"): 0.45, ("taylor", "ce"): 0.55, ("taylor", "kl"): 0.60}
    runs = {(sc, a, s): _score_run(tmp_path, sc, a, s, acc + 0.02 * s) for (sc, a), acc in accs.items() for s in (0, 1)}
    md, rows = make_report([str(r) for r in runs.values()], tmp_path / "out")
    assert "## keep ratio 0.5 · 1000 training examples · score taylor · " in md
    assert "## score × loss · keep ratio 0.5 · 1000 training examples (baseline score gate_up_down)" in md
    assert "| taylor | 70.0% | 0.560 ± 0.014 | 0.610 ± 0.014 |" in md
    comps = {r["name"]: r for r in rows if r["row_type"] == "comparison"}
    assert set(comps) == {"kl-ce", "kl·taylor-kl·gate_up_down", "ce·taylor-ce·gate_up_down"}
    for arm in ("kl", "ce"):
        a = _pq([runs[("taylor", arm, s)] for s in (0, 1)])
        b = _pq([runs[("gate_up_down", arm, s)] for s in (0, 1)])
        iv = stats.bootstrap(a, b)["acc"]
        row = comps[f"{arm}·taylor-{arm}·gate_up_down"]
        assert math.isclose(float(row["acc_mean"]), iv.estimate) and math.isclose(float(row["acc_low"]), iv.low)
        assert float(row["acc_low"]) > 0  # 15 points on 200 questions: the interval excludes 0
    assert "KL·taylor − KL·gate_up_down = " in md and "KL·taylor higher, significant at 0.05" in md
    assert [r["score"] for r in rows if r["row_type"] == "model"] == ["gate_up_down"] * 2 + ["taylor"] * 2
    assert (tmp_path / "out" / "accuracy_by_score.png").stat().st_size > 20_000


def test_study_still_refuses_what_must_match_and_same_score_other_plan(tmp_path):
    a = _score_run(tmp_path, "gate_up_down", "ce", 0, 0.5)
    b = _score_run(tmp_path, "taylor", "ce", 0, 0.5)
    _edit(b, "schedule.lr", 3e-4)
    with pytest.raises(ReportError, match=r"across prune scores\): their schedule.lr differ"):
        make_report([str(a), str(b)], tmp_path / "out")
    c = _score_run(tmp_path, "taylor", "kl", 0, 0.5, plan="z" * 64)  # same score, another calibration
    d = _score_run(tmp_path, "taylor", "ce", 1, 0.5)
    with pytest.raises(ReportError, match="their plan_sha256 differ"):
        make_report([str(c), str(d)], tmp_path / "out")


def test_one_score_report_has_no_score_section(tmp_path):
    runs = [_run(tmp_path, f"{a}{s}", a, s) for a in ("ce", "kl") for s in (0, 1)]
    md, _ = make_report([str(r) for r in runs], tmp_path / "out")
    assert "score" not in md.split("\n", 3)[3] and not (tmp_path / "out" / "accuracy_by_score.png").exists()


def test_a_score_at_a_keep_ratio_the_baseline_score_lacks(tmp_path):
    """The real-model study's cells: both scores at keep 0.5, only taylor at 0.3. The 0.3 group stands alone
    (its own KL − CE, no score comparison), the score study covers 0.5, and the by-score plot has both."""
    runs = [_score_run(tmp_path, sc, arm, 0, 0.5) for sc in ("gate_up_down", "taylor") for arm in ("ce", "kl")]
    for arm in ("ce", "kl"):
        d = _run(tmp_path, f"taylor03_{arm}", arm, 0, acc=0.4, keep=0.3, plan="z" * 64)
        _edit(d, "prune.score", "taylor")
        runs.append(d)
    md, rows = make_report([str(r) for r in runs], tmp_path / "out")
    assert "## keep ratio 0.3 · 1000 training examples · score taylor · " in md
    assert "## score × loss · keep ratio 0.5 · 1000 training examples (baseline score gate_up_down)" in md
    assert "score × loss · keep ratio 0.3" not in md
    comps = [(r["keep_ratio"], r["name"]) for r in rows if r["row_type"] == "comparison"]
    assert (0.3, "kl-ce") in comps and not any(k == 0.3 and "·" in n for k, n in comps)
    assert (tmp_path / "out" / "accuracy_by_score.png").stat().st_size > 20_000


def test_cli_finds_each_keep_ratios_pruned_eval_under_one_dir(tmp_path, capsys):
    """report.pruned_eval=DIR with one evaluation per pruned model under it (slurm/reproduce.sh's layout):
    each group gets its own pruned model's row and comparisons, matched by plan hash."""
    runs = [_run(tmp_path, f"ce_{k}", "ce", acc=0.5, keep=k, plan=p) for k, p in ((0.5, "a" * 64), (0.3, "b" * 64))]
    for (keep, plan), acc in zip(((0.5, "a" * 64), (0.3, "b" * 64)), (0.3, 0.2)):
        d = tmp_path / "eval" / "pruned" / f"keep{keep}"
        _write_eval(d, _probs(*_pattern(acc, 4)), params=700)
        ev = json.loads((d / "eval.json").read_text())
        (d / "eval.json").write_text(json.dumps(ev | {"model": {"pruning_plan_sha256": plan, "params": 700}}))
    out = tmp_path / "report"
    assert cli.main(["report", *map(str, runs), f"report.pruned_eval={tmp_path / 'eval' / 'pruned'}",
                     f"report.output_dir={out}"]) == 0
    rows = list(csv.DictReader((out / "report.csv").open()))
    assert sorted((r["keep_ratio"], r["name"]) for r in rows if r["row_type"] == "comparison") == \
        [("0.3", "ce-pruned"), ("0.5", "ce-pruned")]
    md = (out / "report.md").read_text()
    assert md.count("| pruned, before recovery |") == 2 and md.count("| CE − pruned |") == 2
    capsys.readouterr()
    assert cli.main(["report", str(runs[0]), f"report.pruned_eval={tmp_path / 'nothing'}",
                     f"report.output_dir={out}"]) == 2
    assert "config field 'report.pruned_eval': no eval.json at or under" in capsys.readouterr().err
