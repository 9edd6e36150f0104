"""Compare recovery runs: per-group tables with paired statistics, a CSV, and PNG plots.

Runs are grouped by (keep ratio, training examples, prune score); the seeds of an arm within a group are
its runs' `schedule.seed`. A group is refused unless nothing but the loss and the seed differs between its
runs: same pruning plan and prune settings, schedule, data (incl. max length), loss positions and
temperature, evaluation split, and the same evaluation questions. A CE-vs-KL gap means nothing otherwise.

The score x loss study: runs of one (keep ratio, training examples) pruned with different scores are not
refused as "different plans" but reported as the score dimension, provided everything else that must
match does (all of the above except the plan and the score): a score x arm table, and within each arm every
score against the baseline score (the paper's L2 `gate_up_down` when present) on the same questions with
the same seeds, with the statistics of KL − CE.

Accuracy: each evaluation is judged by its `headline` accuracy (evaluate.HEADLINE: `acc` for data.format=mc,
`acc_per_char` for cloze), which the report calls acc throughout (tables, CIs, McNemar, plots) and names
once per group; its per-question statistics read each example's pred and probs, which are the headline's.
Runs, baselines and GGUF evaluations judged by different accuracies are refused, in a group and in a report.

Statistics (stats.py): mean ± sd over seeds per arm; for KL − CE (seeds paired by seed value) and for
each arm against the pruned-before-recovery model and the teacher, paired bootstrap 95 % CIs of Δacc,
ΔNLL, ΔECE and exact McNemar tests per seed pair, with a verdict that never claims more than the CI.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import lora, stats
from .config import GGUF_TYPES
from .data import LABELS
from .errors import UserError
from .evaluate import ACCURACIES, ECE_BINS, confidence_bins
from .fileio import atomic_write_bytes, atomic_write_text

# Fields that must be equal within a group (dotted: a nested dict is compared leaf by leaf). `adapter`: the
# settings of train.adapter (full with train.freeze_embeddings, or LoRA's rank, alpha, dropout, targets); runs
# are grouped by its label as well, so a LoRA arm is its own arm ("KL·LoRA r16") and never paired with a
# full-parameter run, while a group mixing frozen and trained embeddings is refused.
COMPARED = ("plan_sha256", "prune", "schedule", "data", "loss.positions", "loss.temperature", "eval.split", "adapter")
NOT_COMPARED = {"schedule.seed"}  # seeds are the replicates
ACROSS_SCORES = {"plan_sha256", "prune.score"}  # what may differ between the scores of a study
BASELINE_SCORE = "gate_up_down"  # the paper's L2: what the other scores are compared with
ARM_NAMES = {"ce": "CE", "kl": "KL"}
BASELINE_NAMES = {"pruned": "pruned", "teacher": "teacher"}
DELTA_METRICS = ("acc", "nll", "ece")
COLUMNS = (["row_type", "keep_ratio", "train_examples", "score", "name", "seeds", "n_questions", "split", "accuracy",
            "params_retained"]
           + [f"{m}_{s}" for m in stats.METRICS for s in ("mean", "sd", "low", "high")]
           + ["mcnemar_seed", "mcnemar_b", "mcnemar_c", "mcnemar_p", "runs"])
PLOTS = ("accuracy_vs_keep_ratio.png", "data_size.png", "calibration.png")
SCORE_PLOT = "accuracy_by_score.png"  # written when the runs hold several prune scores


class ReportError(UserError):
    pass


@dataclass
class Model:
    """One evaluated model: an arm's seeds (rows in seed order) or one baseline evaluation (seed None)."""
    name: str
    seeds: list
    metrics: list[dict]
    pq: stats.PerQuestion | None  # questions with a gold answer; None when the split has none
    sources: list[str]
    params_retained: float | None
    ci: dict | None = None  # bootstrap CI of each metric of this model alone (plots, csv)


@dataclass
class Comparison:
    a: str
    b: str
    seeds: list
    intervals: dict[str, stats.Interval]
    mcnemar: list[stats.McNemar]


@dataclass
class Group:
    keep_ratio: float
    train_examples: int
    split: str
    ids: list[str]
    score: str = BASELINE_SCORE  # prune.score of every run in the group
    n_answered: int = 0  # questions with a gold answer: what the paired statistics use
    models: dict[str, Model] = field(default_factory=dict)  # ce, kl, pruned, teacher
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ref: tuple[str, list[dict]] | None = None  # (run dir, examples) the group's questions and answers come from
    plan_sha256: str | None = None
    headline: str = "acc"  # the accuracy every model of the group is judged by (its `acc` here)
    adapter: dict = field(default_factory=lambda: {"kind": "full"})  # run_meta's adapter (with its trainable share)

    def arm_name(self, arm: str) -> str:
        """'CE', 'KL', or with adapters e.g. 'KL·LoRA r16': the name every table and comparison uses."""
        label = lora.label(self.adapter)
        return ARM_NAMES.get(arm, arm.upper()) + (f"·{label}" if label else "")

    def kl_minus_ce(self) -> "Comparison | None":
        return next((c for c in self.comparisons if (c.a, c.b) == (self.arm_name("kl"), self.arm_name("ce"))), None)


@dataclass
class ScoreStudy:
    """One (keep ratio, training examples) pruned with several scores: a group per score, and per arm every
    score against the baseline score."""
    keep_ratio: float
    train_examples: int
    baseline: str
    groups: dict[str, Group]  # score -> its group, baseline first
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- loading and fairness

def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _read_eval_dir(eval_dir: Path, what: str) -> tuple[dict, list[dict]]:
    """eval.json and the per-question rows of one evaluation (both are needed for paired statistics)."""
    for f in ("eval.json", "examples.jsonl"):
        if not (eval_dir / f).is_file():
            raise ReportError(f"{what}: no {eval_dir / f} (per-question results are needed); run `distill-dist eval`")
    return json.loads((eval_dir / "eval.json").read_text()), _read_jsonl(eval_dir / "examples.jsonl")


def load_run(run_dir: str | Path) -> dict:
    run_dir = Path(run_dir)
    done = run_dir / "done.json"
    if not done.is_file():
        raise ReportError(f"{run_dir}: no done.json (the run has not finished)")
    d = json.loads(done.read_text())
    if d.get("eval") is None:
        raise ReportError(f"{run_dir}: the run was not evaluated (train.eval_after=false); run `distill-dist eval`")
    ev, rows = _read_eval_dir(run_dir / "eval", str(run_dir))
    return d | {"run_dir": str(run_dir), "eval_split": ev.get("split"), "examples": rows}


def _flatten(value, prefix: str) -> dict:
    if isinstance(value, dict):
        out = {}
        for k in sorted(value):
            out |= _flatten(value[k], f"{prefix}.{k}")
        return out
    return {prefix: value}


def _fair_view(run: dict, ignore: frozenset = frozenset()) -> dict:
    """The dotted fields that must match, e.g. {'schedule.lr': 1e-4, 'loss.temperature': 1.0, ...}."""
    view = {}
    for name in COMPARED:
        value = {"eval.split": run.get("eval_split"), "adapter": lora.settings_of(run)}.get(name, run)
        if name not in ("eval.split", "adapter"):
            for part in name.split("."):
                value = value.get(part) if isinstance(value, dict) else None
        view |= _flatten(value, name)
    return {k: v for k, v in view.items() if k not in NOT_COMPARED | ignore}


def check_comparable(members: list[dict], where: str, ignore: frozenset = frozenset()) -> None:
    first, view0 = members[0], _fair_view(members[0], ignore)
    for other in members[1:]:
        view = _fair_view(other, ignore)
        for key in sorted(set(view0) | set(view), key=lambda k: (COMPARED.index(_root(k)), k)):
            if view0.get(key) != view.get(key):
                raise ReportError(f"refusing to compare {first['run_dir']} and {other['run_dir']} ({where}): "
                                  f"their {key} differ ({_short(view0.get(key))} vs {_short(view.get(key))})")


def _root(key: str) -> str:
    return next(c for c in COMPARED if key == c or key.startswith(c + "."))


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True)
    return s if len(s) <= 80 else s[:77] + "..."


def _check_questions(ref: tuple[str, list[dict]], other: tuple[str, list[dict]]) -> None:
    """Paired statistics need the same questions with the same gold answers."""
    a = {r["id"]: r["gold"] for r in ref[1]}
    b = {r["id"]: r["gold"] for r in other[1]}
    if a.keys() != b.keys():
        raise ReportError(f"refusing to compare {ref[0]} and {other[0]}: evaluated on different question sets "
                          f"({len(a)} vs {len(b)} questions, {len(a.keys() ^ b.keys())} ids in only one)")
    bad = sum(a[k] != b[k] for k in a)
    if bad:
        raise ReportError(f"refusing to compare {ref[0]} and {other[0]}: {bad} questions have different gold answers")


def _per_question(rows_per_seed: list[list[dict]], ids: list[str]) -> stats.PerQuestion | None:
    """[S, Q] arrays over the questions (in `ids` order) that have a gold answer."""
    by_id = [{r["id"]: r for r in rows} for rows in rows_per_seed]
    keep = [i for i in ids if by_id[0][i]["gold"] is not None]
    if not keep:
        return None
    probs = np.array([[m[i]["probs"] for i in keep] for m in by_id], dtype=np.float64)
    pred = np.array([[LABELS.index(m[i]["pred"]) for i in keep] for m in by_id])
    gold = np.array([LABELS.index(by_id[0][i]["gold"]) for i in keep])
    return stats.PerQuestion.from_probs(probs, gold, pred)


def _load_baseline(path: str | None, field_name: str) -> dict | None:
    """A teacher / pruned evaluation: eval.json (or its directory) with examples.jsonl beside it."""
    if not path:
        return None
    p = Path(path)
    eval_dir = p if p.is_dir() else p.parent
    if not (eval_dir / "eval.json").is_file():
        raise ReportError(f"config field '{field_name}': no such file '{eval_dir / 'eval.json'}'")
    ev, rows = _read_eval_dir(eval_dir, f"config field '{field_name}'")
    return ev | {"source": str(eval_dir), "examples": rows}


def pruned_eval_paths(path: str | None) -> list[str]:
    """report.pruned_eval: one evaluation (eval.json or its directory), or a directory holding several (one
    per keep ratio and score, as slurm/reproduce.sh writes them); each is matched to its runs by plan hash."""
    if not path:
        return []
    p = Path(path)
    if p.is_file() or (p / "eval.json").is_file():
        return [path]
    found = sorted(str(f.parent) for f in p.rglob("eval.json")
                   if json.loads(f.read_text()).get("backend") != "llamacpp") if p.is_dir() else []
    if not found:
        raise ReportError(f"config field 'report.pruned_eval': no eval.json at or under '{p}'")
    return found


def _pruned_matches(pruned: dict, run: dict) -> bool:
    """Is this evaluation of the pruned checkpoint the run started from? By plan hash (recorded by
    `distill-dist eval`, else read beside the checkpoint), else by parameter count."""
    model = pruned.get("model", {})
    plan_file = Path(model.get("path") or "/nonexistent") / "pruning_plan.json"
    plan = model.get("pruning_plan_sha256") or (json.loads(plan_file.read_text()).get("plan_sha256")
                                                if plan_file.is_file() else None)
    return plan == run["plan_sha256"] if plan else model.get("params") == run["params_after"]


# ---------------------------------------------------------------- groups and statistics

def headline_of(metrics: dict) -> str:
    """The accuracy an evaluation is judged by: its recorded `headline` (`acc` where none is recorded, as in
    an evaluation written before data.format existed, which was mc)."""
    return metrics.get("headline", "acc")


def judged(metrics: dict) -> dict:
    """An evaluation's metrics as the report reads them: `acc` is its headline accuracy."""
    return {**metrics, "acc": metrics[headline_of(metrics)]}


def _check_headline(headline: str, metrics: dict, source: str, ref: str) -> None:
    if headline_of(metrics) != headline:
        raise ReportError(f"refusing to compare {ref} and {source}: judged by different accuracies "
                          f"({headline} vs {headline_of(metrics)}: another data.format)")


def _arm_model(arm: str, name: str, members: list[dict], ids: list[str]) -> Model:
    by_seed = sorted(members, key=lambda r: r["schedule"].get("seed"))
    seeds = [r["schedule"].get("seed") for r in by_seed]
    for x, y in zip(by_seed, by_seed[1:]):
        if x["schedule"].get("seed") == y["schedule"].get("seed"):
            raise ReportError(f"refusing to report {x['run_dir']} and {y['run_dir']}: two {ARM_NAMES.get(arm, arm)} "
                              f"runs with schedule.seed {x['schedule'].get('seed')} in one group; give each seed once")
    return Model(name, seeds, [judged(r["eval"]) for r in by_seed],
                 _per_question([r["examples"] for r in by_seed], ids), [r["run_dir"] for r in by_seed],
                 by_seed[0]["params_after"] / by_seed[0]["params_before"])


def _baseline_model(key: str, ev: dict, params_before: int) -> Model:
    params = ev.get("model", {}).get("params")
    return Model(BASELINE_NAMES[key], [None], [judged(ev["metrics"])], None, [ev["source"]],
                 params / params_before if params else None)


def build_group(members: list[dict], teacher: dict | None, pruned: list[dict]) -> Group:
    """Check one (keep ratio, training examples) group, then compute every model's and comparison's stats.
    Of the `pruned` evaluations, the one of the checkpoint these runs started from is the group's baseline."""
    first = members[0]
    where = f"keep {first['keep_ratio']}, {first['schedule']['train_examples']} examples"
    check_comparable(members, where)
    ref = (first["run_dir"], first["examples"])
    for r in members[1:]:
        _check_questions(ref, (r["run_dir"], r["examples"]))
    ids = [r["id"] for r in first["examples"]]
    g = Group(first["keep_ratio"], first["schedule"]["train_examples"], first["eval_split"], ids, run_score(first),
              ref=ref, plan_sha256=first["plan_sha256"], headline=headline_of(first["eval"]),
              adapter=first.get("adapter", {"kind": "full"}))
    for r in members[1:]:
        _check_headline(g.headline, r["eval"], r["run_dir"], first["run_dir"])
    for arm in sorted({r["arm"] for r in members}):
        g.models[arm] = _arm_model(arm, g.arm_name(arm), [r for r in members if r["arm"] == arm], ids)
    baselines = {"pruned": next((ev for ev in pruned if _pruned_matches(ev, first)), None), "teacher": teacher}
    if pruned and baselines["pruned"] is None:
        g.notes.append(f"{', '.join(ev['source'] for ev in pruned)}: not the pruning these runs started from "
                       f"(plan {first['plan_sha256'][:12]}); no comparison with it")
    for key, ev in baselines.items():
        if ev is None:
            continue
        if ev.get("split") != g.split:
            raise ReportError(f"refusing to compare {ev['source']} and {first['run_dir']}: their eval.split differ "
                              f"({_short(ev.get('split'))} vs {_short(g.split)})")
        _check_questions(ref, (ev["source"], ev["examples"]))
        _check_headline(g.headline, ev["metrics"], ev["source"], first["run_dir"])
        g.models[key] = _baseline_model(key, ev, first["params_before"])
        g.models[key].pq = _per_question([ev["examples"]], ids)
    for m in g.models.values():
        m.ci = stats.bootstrap(m.pq) if m.pq is not None else None
        g.n_answered = m.pq.shape[1] if m.pq is not None else 0
    _compare_all(g)
    return g


def _compare_all(g: Group) -> None:
    arms = [k for k in ("kl", "ce") if k in g.models]
    pairs = [("kl", "ce")] if len(arms) == 2 else []
    pairs += [(a, b) for b in ("pruned", "teacher") if b in g.models for a in arms]
    for a_key, b_key in pairs:
        _paired(g.models[a_key], g.models[b_key], g.split, g.comparisons, g.notes)


def _paired(a: Model, b: Model, split: str, comparisons: list, notes: list, names: tuple | None = None) -> None:
    """a − b on the same questions: seeds paired by value (a single-evaluation b pairs with every seed)."""
    a_name, b_name = names or (a.name, b.name)
    if a.pq is None:
        notes.append(f"{a_name} − {b_name}: the {split} split has no gold answers; no paired statistics")
        return
    if b.seeds == [None]:
        comparisons.append(_compare(a_name, b_name, a.seeds, a.pq, b.pq))
        return
    common = sorted(set(a.seeds) & set(b.seeds))
    if len(common) < max(len(a.seeds), len(b.seeds)):
        notes.append(f"{a_name} − {b_name}: paired on seeds {_seeds(common) or 'none'} "
                     f"({a_name} has {_seeds(a.seeds)}, {b_name} has {_seeds(b.seeds)})")
    if common:
        comparisons.append(_compare(a_name, b_name, common, a.pq.seeds([a.seeds.index(s) for s in common]),
                                    b.pq.seeds([b.seeds.index(s) for s in common])))


def _compare(a: str, b: str, seeds: list, a_pq: stats.PerQuestion, b_pq: stats.PerQuestion) -> Comparison:
    return Comparison(a, b, seeds, stats.bootstrap(a_pq, b_pq), stats.mcnemar_per_pair(a_pq, b_pq))


def run_score(run: dict) -> str:
    return run.get("prune", {}).get("score", BASELINE_SCORE)


def build_study(groups: list[Group], members: dict[str, list[dict]]) -> ScoreStudy:
    """The groups of one (keep ratio, training examples) with different scores: refused unless only the plan
    and the score differ and the questions are the same; then per arm each score − the baseline score."""
    first = groups[0]
    where = f"keep {first.keep_ratio}, {first.train_examples} examples, across prune scores"
    heads = [members[g.score][0] for g in groups]
    check_comparable(heads, where, ignore=frozenset(ACROSS_SCORES))
    for other in heads[1:]:
        _check_questions((heads[0]["run_dir"], heads[0]["examples"]), (other["run_dir"], other["examples"]))
    scores = [g.score for g in groups]
    baseline = BASELINE_SCORE if BASELINE_SCORE in scores else scores[0]
    by_score = {baseline: next(g for g in groups if g.score == baseline)}
    by_score |= {g.score: g for g in groups if g.score != baseline}
    study = ScoreStudy(first.keep_ratio, first.train_examples, baseline, by_score)
    for arm in ("kl", "ce"):
        for score, g in by_score.items():
            base = by_score[baseline].models.get(arm)
            if score == baseline or arm not in g.models or base is None:
                continue
            name = g.arm_name(arm)
            _paired(g.models[arm], base, g.split, study.comparisons, study.notes,
                    names=(f"{name}·{score}", f"{name}·{baseline}"))
    return study


def _seeds(seeds: list) -> str:
    return ", ".join("—" if s is None else str(s) for s in seeds)  # None: a single evaluation, no seed


def mean_sd(model: Model, metric: str) -> tuple[float | None, float | None]:
    """Mean over seeds and sample sd (ddof 1; None with one seed) of one recorded metric."""
    vals = [m.get(metric) for m in model.metrics]
    if any(v is None for v in vals):
        return None, None
    return float(np.mean(vals)), (float(np.std(vals, ddof=1)) if len(vals) > 1 else None)


# ---------------------------------------------------------------- markdown and csv

METHOD = (
    "Per model: mean ± sd over seeds (sample sd; — with one seed). Δ = first − second on the same questions: "
    f"paired bootstrap {stats.LEVEL:.0%} CI ({stats.N_BOOT} replicates, generator seed {stats.BOOT_SEED}; questions "
    "resampled, and seed pairs too when there are several); 'significant at 0.05' means the CI excludes 0. "
    "KL and CE runs are paired by seed; the pruned model and the teacher (one evaluation each) are paired with "
    "every seed. McNemar: exact binomial test on the discordant questions, one test per seed pair (not pooled: "
    "a question repeated across seeds is not an independent observation), shown as b/c (questions only the "
    "first / only the second gets right) and p.")


def _cell(mean: float | None, sd: float | None, baseline: bool) -> str:
    if mean is None:
        return "—"
    return f"{mean:.3f}" if baseline else f"{mean:.3f} ± {'—' if sd is None else f'{sd:.3f}'}"


def _mcnemar_cell(c: Comparison) -> str:
    return "; ".join(f"{'' if s is None else f'seed {s}: '}{t.b}/{t.c}, p={t.p:.3g}"
                     for s, t in zip(c.seeds, c.mcnemar))


def verdict_line(c: Comparison) -> str:
    """Accuracy first, then NLL and ECE; each names a direction only when its CI excludes 0."""
    parts = [stats.verdict(c.a, c.b, m, c.intervals[m]) for m in DELTA_METRICS]
    caveat = " (one seed pair: the CIs cover question sampling only, not training noise)" if len(c.seeds) == 1 else ""
    return "; ".join(parts) + caveat


def accuracy_line(headline: str) -> str:
    """What acc means in a group's tables and intervals."""
    return (f"acc, Δacc: {headline} ({ACCURACIES[headline][1]}); NLL, Brier, ECE and entropy of its distribution "
            "over the five choices.")


def group_markdown(g: Group, with_score: bool = False) -> list[str]:
    score = f" · score {g.score}" if with_score else ""
    out = [f"## keep ratio {g.keep_ratio} · {g.train_examples} training examples{score}{adapter_header(g.adapter)} · "
           f"split {g.split} · "
           f"{len(g.ids)} questions ({g.n_answered} with answers)", "", accuracy_line(g.headline), "",
           "| model | seeds | params | acc | NLL | Brier | ECE | entropy |", "|---|---|---|---|---|---|---|---|"]
    for key, m in g.models.items():
        base = key in BASELINE_NAMES
        name = {"pruned": "pruned, before recovery", "teacher": "unpruned teacher"}.get(key, m.name)
        params = "—" if m.params_retained is None else f"{m.params_retained:.1%}"
        cells = [_cell(*mean_sd(m, k), base) for k in stats.METRICS]
        out.append(f"| {name} | {'—' if base else _seeds(m.seeds)} | {params} | " + " | ".join(cells) + " |")
    return out + _comparisons_markdown(g.comparisons, g.notes) + [""]


def adapter_header(adapter: dict) -> str:
    """' · LoRA r16 (alpha 32, 0.8 % of parameters trained)' for a LoRA group, ' · embeddings frozen (27.69 % of
    parameters trained)' for full recovery with train.freeze_embeddings; '' for full recovery."""
    share = adapter.get("trainable_share")
    trained = [] if share is None else [f"{share:.2%} of parameters trained"]
    if adapter.get("kind", "full") == "full":
        frozen = adapter.get("freeze_embeddings")
        return " · embeddings frozen" + "".join(f" ({t})" for t in trained) if frozen else ""
    return f" · {lora.label(adapter)} (" + ", ".join([f"alpha {adapter['alpha']:g}", *trained]) + ")"


def adapter_cell(adapter: dict) -> str:
    """The overview's adapter column: 'full', 'full, embeddings frozen' or the LoRA label."""
    if adapter.get("kind", "full") == "full":
        return "full, embeddings frozen" if adapter.get("freeze_embeddings") else "full"
    return lora.label(adapter)


def _comparisons_markdown(comparisons: list[Comparison], notes: list[str]) -> list[str]:
    out = []
    if comparisons:
        out += ["", "| comparison | seed pairs | Δacc, pts [95% CI] | ΔNLL [95% CI] | ΔECE [95% CI] | "
                "McNemar exact, per seed pair |", "|---|---|---|---|---|---|"]
        for c in comparisons:
            ivs = [stats.format_interval(m, c.intervals[m]).replace(" pts", "") for m in DELTA_METRICS]
            out.append(f"| {c.a} − {c.b} | {_seeds(c.seeds)} | " + " | ".join(ivs) + f" | {_mcnemar_cell(c)} |")
        out += ["", "Verdicts:"] + [f"- {verdict_line(c)}" for c in comparisons]
    out += [""] if notes and not comparisons else []
    return out + [f"- note: {n}" for n in notes]


def overview_markdown(groups: list[Group], with_score: bool = False) -> list[str]:
    """One row per group, the plots' points as numbers (with several groups; each group's section has the rest)."""
    score = "score | " if with_score else ""
    adapters = any(adapter_cell(g.adapter) != "full" for g in groups)
    out = [f"| keep ratio | training examples | {score}{'adapter | ' if adapters else ''}seeds | CE acc | KL acc | "
           "pruned acc | KL − CE, pts [95% CI] |",
           "|---|---|---|---|---|---|---|" + ("---|" if with_score else "") + ("---|" if adapters else "")]
    for g in groups:
        accs = [_cell(mean_sd(g.models[k], "acc")[0], None, True) if k in g.models else "—"
                for k in ("ce", "kl", "pruned")]
        seeds = sorted({s for k in ("ce", "kl") if k in g.models for s in g.models[k].seeds})
        kl_ce = g.kl_minus_ce()
        delta = stats.format_interval("acc", kl_ce.intervals["acc"]).replace(" pts", "") if kl_ce else "—"
        score = f"{g.score} | " if with_score else ""
        score += f"{adapter_cell(g.adapter)} | " if adapters else ""
        out.append(f"| {g.keep_ratio} | {g.train_examples} | {score}{_seeds(seeds)} | " + " | ".join(accs)
                   + f" | {delta} |")
    return out + [""]


def study_markdown(st: ScoreStudy) -> list[str]:
    """The score x arm table (accuracy mean ± sd over seeds, KL − CE per score) and each score − the baseline
    score within each arm."""
    out = [f"## score × loss · keep ratio {st.keep_ratio} · {st.train_examples} training examples "
           f"(baseline score {st.baseline})", "",
           "| score | params | CE acc | KL acc | KL − CE Δacc, pts [95% CI] |", "|---|---|---|---|---|"]
    for score, g in st.groups.items():
        cells = [_cell(*mean_sd(g.models[k], "acc"), False) if k in g.models else "—" for k in ("ce", "kl")]
        kl_ce = g.kl_minus_ce()
        delta = stats.format_interval("acc", kl_ce.intervals["acc"]).replace(" pts", "") if kl_ce else "—"
        arm = next((m for k, m in g.models.items() if k in ARM_NAMES), None)
        params = "—" if arm is None or arm.params_retained is None else f"{arm.params_retained:.1%}"
        out.append(f"| {score} | {params} | {cells[0]} | {cells[1]} | {delta} |")
    return out + _comparisons_markdown(st.comparisons, st.notes) + [""]


def to_markdown(groups: list[Group], studies: list[ScoreStudy] = ()) -> str:
    with_score = len({g.score for g in groups}) > 1
    out = ["# Recovery report", "", METHOD, ""] + (overview_markdown(groups, with_score) if len(groups) > 1 else [])
    for g in groups:
        out += group_markdown(g, with_score)
    for st in studies:
        out += study_markdown(st)
    return "\n".join(out)


def _model_row(key: str, m: Model) -> dict:
    row = {"row_type": "model", "name": key, "seeds": ";".join("" if s is None else str(s) for s in m.seeds),
           "params_retained": m.params_retained, "runs": ";".join(m.sources)}
    for metric in stats.METRICS:
        row[f"{metric}_mean"], row[f"{metric}_sd"] = mean_sd(m, metric)
        if m.ci is not None:
            row[f"{metric}_low"], row[f"{metric}_high"] = m.ci[metric].low, m.ci[metric].high
    return row


def csv_rows(groups: list[Group], studies: list[ScoreStudy] = ()) -> list[dict]:
    """One row per model per group (mean/sd over seeds, bootstrap CI of the model alone), one per comparison
    (Δ estimate in *_mean, CI in *_low/*_high) and one per comparison and seed pair (McNemar); a study's
    score − baseline comparisons are named like 'kl·taylor-kl·gate_up_down'."""
    rows = []
    for g in groups:
        common = {"keep_ratio": g.keep_ratio, "train_examples": g.train_examples, "score": g.score, "split": g.split,
                  "accuracy": g.headline}
        for key, m in g.models.items():
            rows.append({**common, "n_questions": None if m.pq is None else m.pq.shape[1], **_model_row(key, m)})
        rows += _comparison_rows(g.comparisons, common, g.n_answered)
    for st in studies:
        g0 = st.groups[st.baseline]
        common = {"keep_ratio": st.keep_ratio, "train_examples": st.train_examples, "score": None, "split": g0.split,
                  "accuracy": g0.headline}
        rows += _comparison_rows(st.comparisons, common, g0.n_answered)
    return [{k: r.get(k) for k in COLUMNS} for r in rows]


def _comparison_rows(comparisons: list[Comparison], common: dict, n_questions: int) -> list[dict]:
    rows = []
    for c in comparisons:
        name = f"{c.a.lower()}-{c.b.lower()}"
        row = {**common, "row_type": "comparison", "name": name, "seeds": ";".join(map(str, c.seeds)),
               "n_questions": n_questions}
        for metric, iv in c.intervals.items():
            row |= {f"{metric}_mean": iv.estimate, f"{metric}_low": iv.low, f"{metric}_high": iv.high}
        rows.append(row)
        rows += [{**common, "row_type": "mcnemar", "name": name, "mcnemar_seed": s, "mcnemar_b": t.b,
                  "mcnemar_c": t.c, "mcnemar_p": t.p} for s, t in zip(c.seeds, c.mcnemar)]
    return rows


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


# ---------------------------------------------------------------- plots

STYLE = {"ce": ("C0", "o"), "kl": ("C1", "s"), "pruned": ("C2", "x"), "teacher": ("0.4", "^")}
LINESTYLES = ("-", "--", ":", "-.")
BAND = "95% bootstrap CI (questions × seeds)"


def _mean_ci(m: Model, metric: str) -> tuple[float, float, float] | None:
    mean = mean_sd(m, metric)[0]
    if mean is None or m.ci is None:
        return None
    return mean, m.ci[metric].low, m.ci[metric].high


def _with_interval(ax, x, mean_lo_hi, fmt: str, color, label: str) -> None:
    """Points/line at the means and a vertical bar over each interval (drawn as is: a percentile CI of
    ECE need not contain the point estimate, so no symmetric-error-bar arithmetic)."""
    y, lo, hi = zip(*mean_lo_hi)
    ax.plot(x, y, fmt, color=color, label=label)
    ax.vlines(x, lo, hi, color=color, lw=1.2)


def _plot_accuracy(groups: list[Group], plt):
    fig, ax = plt.subplots(figsize=(8, 4.6))
    sizes = sorted({g.train_examples for g in groups})
    ratios = sorted({g.keep_ratio for g in groups})
    x_lo, x_hi = max(0.0, ratios[0] - 0.05), min(1.02, ratios[-1] + 0.05)
    lines = [(key, n) for key in ("ce", "kl") for n in sizes]
    dodge = (x_hi - x_lo) * 0.012  # side by side at one ratio, so the error bars do not hide one another
    y_seen = []
    for k, (key, n) in enumerate(lines):
        color, marker = STYLE[key]
        pts = sorted((g.keep_ratio, _mean_ci(g.models[key], "acc")) for g in groups
                     if g.train_examples == n and key in g.models and _mean_ci(g.models[key], "acc"))
        if pts:
            dx = (k - (len(lines) - 1) / 2) * dodge
            _with_interval(ax, [p[0] + dx for p in pts], [p[1] for p in pts], marker + LINESTYLES[sizes.index(n) % 4],
                           color, f"{ARM_NAMES[key]} ({n} examples)")
            y_seen += [v for p in pts for v in p[1]]
    y_seen += _draw_pruned(ax, groups, STYLE["pruned"][0], "pruned, before recovery")
    y_seen += _draw_teacher(ax, groups)
    _fit_accuracy_axis(ax, y_seen)
    ax.set_xlim(x_lo, x_hi)
    ax.set_xticks(ratios)
    ax.set_xlabel("MLP keep ratio")
    ax.set_ylabel(accuracy_axis(groups[0].headline))
    ax.set_title(f"Accuracy after recovery (mean over seeds)\nerror bars: {BAND}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return fig


def _draw_pruned(ax, groups: list[Group], color: str, label: str) -> list[float]:
    """The groups' pruned models before recovery, one cross per keep ratio (groups sharing a pruned model draw it
    once); returns the accuracies and interval ends drawn, for the axis range."""
    pts = sorted({(g.keep_ratio, _mean_ci(g.models["pruned"], "acc")) for g in groups if "pruned" in g.models
                  and _mean_ci(g.models["pruned"], "acc")})
    if pts:
        _with_interval(ax, [p[0] for p in pts], [p[1] for p in pts], "x:", color, label)
    return [v for p in pts for v in p[1]]


def _draw_teacher(ax, groups: list[Group]) -> list[float]:
    """The unpruned teacher's accuracy as a dashed line; returns it (or nothing) for the axis range."""
    teacher = next((g.models["teacher"] for g in groups if "teacher" in g.models), None)
    if teacher is None or teacher.metrics[0].get("acc") is None:
        return []
    ax.axhline(teacher.metrics[0]["acc"], color=STYLE["teacher"][0], ls="--", label="unpruned teacher")
    return [teacher.metrics[0]["acc"]]


def _plot_data_size(groups: list[Group], plt):
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    ratios = sorted({g.keep_ratio for g in groups}, reverse=True)
    for ax, metric in zip(axes.ravel(), ("acc", "nll", "ece", "entropy")):
        for key in ("ce", "kl"):
            for i, ratio in enumerate(ratios):
                pts = sorted((g.train_examples, _mean_ci(g.models[key], metric)) for g in groups
                             if g.keep_ratio == ratio and key in g.models and _mean_ci(g.models[key], metric))
                if not pts:
                    continue
                x = [p[0] for p in pts]
                label = ARM_NAMES[key] + (f" keep {ratio}" if len(ratios) > 1 else "")
                _with_interval(ax, x, [p[1] for p in pts], STYLE[key][1] + LINESTYLES[i % 4], STYLE[key][0], label)
                if len(x) > 1:
                    ax.fill_between(x, [p[1][1] for p in pts], [p[1][2] for p in pts], color=STYLE[key][0],
                                    alpha=0.12, lw=0)
        # the baselines as horizontal lines: the teacher, and the pruned model in its keep ratio's line style
        baselines = [("teacher", "--", "unpruned teacher", None)]
        baselines += [("pruned", LINESTYLES[i % 4], f"pruned to {r}, before recovery", r) for i, r in enumerate(ratios)]
        for key, ls, label, ratio in baselines:
            g = next((g for g in groups if key in g.models and ratio in (None, g.keep_ratio)), None)
            if g is not None and g.models[key].metrics[0].get(metric) is not None:
                ax.axhline(g.models[key].metrics[0][metric], color=STYLE[key][0], ls=ls, lw=1, label=label)
        ax.set_xscale("log")
        ax.set_xticks(sorted({g.train_examples for g in groups}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training examples (log scale)")
        ax.set_ylabel(stats.LABELS[metric])
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8)
    fig.suptitle(f"Recovery against training-set size (mean over seeds; band/bars: {BAND})", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return fig


def _reliability(pq: stats.PerQuestion) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per ECE bin, pooled over seeds: mean confidence, accuracy, count; and all counts (empty bins 0)."""
    conf, correct = pq.conf.ravel(), pq.correct.ravel()
    bins = confidence_bins(conf)
    counts = np.bincount(bins, minlength=ECE_BINS)
    used = counts > 0
    mean_conf = np.bincount(bins, conf, ECE_BINS)[used] / counts[used]
    acc = np.bincount(bins, correct, ECE_BINS)[used] / counts[used]
    return mean_conf, acc, counts[used], counts


def _plot_calibration(groups: list[Group], plt):
    cols = min(len(groups), 4)
    rows = -(-len(groups) // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(4.2 * cols, 6.2 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1] * rows})
    edges = np.linspace(0, 1, ECE_BINS + 1)
    for i, g in enumerate(groups):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        top.plot([0, 1], [0, 1], color="lightgray", ls="--", lw=1)
        for key, m in g.models.items():
            if m.pq is None:
                continue
            color = STYLE[key][0]
            c, a, n, all_counts = _reliability(m.pq)
            ece = mean_sd(m, "ece")[0]
            top.plot(c, a, "-", color=color, lw=1,
                     label=f"{m.name if key in ARM_NAMES else key} (ECE {ece:.3f})" if ece is not None else m.name)
            top.scatter(c, a, s=600 * n / n.sum() + 6, color=color, alpha=0.6, edgecolors="none")
            bottom.stairs(all_counts / all_counts.sum(), edges, color=color, lw=1.2)
        score = f", {g.score}" if len({x.score for x in groups}) > 1 else ""
        top.set_title(f"keep {g.keep_ratio}{score}, {g.train_examples} examples{adapter_header(g.adapter)}",
                      fontsize=9)
        top.set_xlim(0, 1), top.set_ylim(0, 1)
        top.set_ylabel("accuracy")
        if top.get_legend_handles_labels()[0]:
            top.legend(fontsize=7, loc="upper left")
        bottom.set_xlim(0, 1)
        bottom.set_xlabel("confidence (max probability over A-E)")
        bottom.set_ylabel("share of answers")
    for j in range(len(groups), rows * cols):
        axes[2 * (j // cols), j % cols].axis("off"), axes[2 * (j // cols) + 1, j % cols].axis("off")
    fig.suptitle(f"Reliability, pooled over seeds ({ECE_BINS} bins)\nmarker area and lower panel: answers per bin",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def _plot_by_score(groups: list[Group], plt):
    """Accuracy against keep ratio, one line per (score, arm): colour = score, marker and line = arm; each score's
    pruned models before recovery as crosses; one panel per training-set size."""
    sizes = sorted({g.train_examples for g in groups})
    scores = sorted({g.score for g in groups}, key=lambda s: (s != BASELINE_SCORE, s))
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.5 * len(sizes) + 2.5, 4.6), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        for i, score in enumerate(scores):
            for key, (fmt, dx) in (("ce", ("o-", -0.004)), ("kl", ("s--", 0.004))):
                pts = sorted((g.keep_ratio, _mean_ci(g.models[key], "acc")) for g in groups
                             if g.train_examples == n and g.score == score and key in g.models
                             and _mean_ci(g.models[key], "acc"))
                if pts:
                    _with_interval(ax, [p[0] + dx for p in pts], [p[1] for p in pts], fmt, f"C{i % 10}",
                                   f"{ARM_NAMES[key]} · {score}")
            _draw_pruned(ax, [g for g in groups if g.train_examples == n and g.score == score], f"C{i % 10}",
                         f"pruned · {score}")
        _draw_teacher(ax, groups)
        ax.axhline(1 / len(LABELS), color="lightgray", ls=":", label="chance")
        ax.set_xlim(0, 1.02)
        ax.set_xlabel("MLP keep ratio")
        ax.set_ylabel(accuracy_axis(groups[0].headline))
        ax.set_title(f"{n} training examples", fontsize=9)
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"Accuracy after recovery per prune score and arm (mean over seeds; bars: {BAND})", fontsize=10)
    fig.tight_layout()
    return fig



def accuracy_axis(headline: str) -> str:
    return "CSQA accuracy" + ("" if headline == "acc" else f" ({headline})")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})  # no version stamp: stable bytes
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot(groups: list[Group], out_dir: Path) -> list[Path]:
    """The PLOTS (the arms' figures from the baseline score's groups when there are several scores) and, with
    several scores, SCORE_PLOT."""
    plt = _pyplot()
    scores = {g.score for g in groups}
    main = [g for g in groups if g.score == (BASELINE_SCORE if BASELINE_SCORE in scores else min(scores))]
    full = [g for g in main if g.adapter.get("kind", "full") == "full"]
    main = full or main  # the curves are full recovery's when there is any; LoRA groups have the tables
    figures = [(PLOTS[0], _plot_accuracy, main), (PLOTS[1], _plot_data_size, main),
               (PLOTS[2], _plot_calibration, groups)]
    figures += [(SCORE_PLOT, _plot_by_score, groups)] if len(scores) > 1 else []
    paths = []
    for name, fn, shown in figures:
        _save_figure(fn(shown, plt), out_dir / name)
        paths.append(out_dir / name)
    return paths


# ---------------------------------------------------------------- on the edge device (GGUF evaluations)

EDGE_PLOT = "accuracy_vs_bytes.png"
EDGE_CSV = "edge.csv"
EDGE_ORDER = ("teacher", "pruned", "ce", "kl")
EDGE_COLUMNS = ["row_type", "keep_ratio", "train_examples", "name", "type", "seeds", "n_questions", "accuracy",
                "acc_mean", "acc_low", "acc_high", "nll_mean", "nll_low", "nll_high", "ece_mean", "ece_low", "ece_high",
                "file_bytes", "peak_rss_bytes", "load_s", "threads", "prompt_tok_s", "gen_tok_s", "fallback_tensors"]


@dataclass
class EdgeGroup:
    """The GGUF evaluations that belong to one Group: a Model per (model key, type), seeds as in the group."""
    group: Group
    models: dict[tuple[str, str], Model] = field(default_factory=dict)
    evals: dict[tuple[str, str], list[dict]] = field(default_factory=dict)  # eval.json of each seed
    comparisons: list[Comparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def load_edge_evals(paths: list[str]) -> list[dict]:
    """Every llama.cpp evaluation (eval.json with backend llamacpp, examples.jsonl beside it) at or under paths."""
    found = []
    for p in map(Path, paths):
        if not p.exists():
            raise ReportError(f"config field 'report.edge': no such path '{p}'")
        for f in [p / "eval.json"] if (p / "eval.json").is_file() else sorted(p.rglob("eval.json")):
            if json.loads(f.read_text()).get("backend") == "llamacpp":
                ev, rows = _read_eval_dir(f.parent, "config field 'report.edge'")
                found.append(ev | {"source": str(f.parent), "examples": rows})
    return found


def _edge_owners(g: Group, baselines: dict[str, dict]) -> dict[str, tuple[str, object]]:
    """Source checkpoint fingerprint -> (model key, seed) for the models of this group."""
    owners = {ev.get("model", {}).get("fingerprint"): (key, None) for key, ev in baselines.items() if key in g.models}
    for key in ("ce", "kl"):
        if key in g.models:
            for seed, run_dir in zip(g.models[key].seeds, g.models[key].sources):
                ev = json.loads((Path(run_dir) / "eval" / "eval.json").read_text())
                owners[ev.get("model", {}).get("fingerprint")] = (key, seed)
    owners.pop(None, None)
    return owners


def build_edge_group(g: Group, baselines: dict[str, dict], edge: list[dict], run_fps: set[str]) -> EdgeGroup | None:
    """Match GGUF evaluations to this group's models by source fingerprint (the pruned checkpoint, when it has no
    evaluation of its own in the report, by plan hash among the non-run sources); type − f16 and KL − CE per type."""
    owners = _edge_owners(g, baselines)
    per: dict[tuple[str, str], dict] = {}
    for ev in edge:
        owner = owners.get(ev["model"]["fingerprint"])
        if (owner is None and "pruned" not in g.models and ev["model"]["fingerprint"] not in run_fps
                and ev["model"].get("pruning_plan_sha256") == g.plan_sha256):
            owner = ("pruned", None)  # the pruned checkpoint itself, when report.pruned_eval is not given
        if owner is None:
            continue
        if ev.get("split") != g.split:
            raise ReportError(f"refusing to compare {ev['source']} with keep {g.keep_ratio}: eval.split "
                              f"{ev.get('split')} vs {g.split}")
        _check_questions(g.ref, (ev["source"], ev["examples"]))
        _check_headline(g.headline, ev["metrics"], ev["source"], g.ref[0])
        per.setdefault((owner[0], ev["model"]["gguf_type"]), {})[owner[1]] = ev
    if not any(key in ("ce", "kl") for key, _ in per):  # the teacher alone: its table stands under a group with runs
        return None
    eg = EdgeGroup(g)
    order = lambda kv: (EDGE_ORDER.index(kv[0][0]), GGUF_TYPES.index(kv[0][1]))  # noqa: E731
    for (key, t), by_seed in sorted(per.items(), key=order):
        seeds = sorted(by_seed, key=lambda s: -1 if s is None else s)
        evs = [by_seed[s] for s in seeds]
        name = g.arm_name(key) if key in ARM_NAMES else key
        m = Model(f"{name} {t}", seeds, [judged(e["metrics"]) for e in evs], _per_question([e["examples"] for e in evs], g.ids),
                  [e["source"] for e in evs], g.models[key].params_retained if key in g.models else None)
        m.ci = stats.bootstrap(m.pq) if m.pq is not None else None
        eg.models[(key, t)], eg.evals[(key, t)] = m, evs
    types = [t for t in GGUF_TYPES if any(k[1] == t for k in eg.models)]
    pairs = [(("kl", t), ("ce", t)) for t in types]
    pairs += [((key, t), (key, "f16")) for key in EDGE_ORDER for t in types if t != "f16"]
    for a, b in pairs:
        if a in eg.models and b in eg.models and eg.models[a].pq is not None:
            _paired(eg.models[a], eg.models[b], eg.group.split, eg.comparisons, eg.notes)
    return eg


def _edge_figures(evs: list[dict]) -> dict:
    """Bytes, peak RSS, load time and tokens/s at the first measured thread count, averaged over seeds."""
    sp = [e["edge"]["speed"][0] for e in evs if e["edge"]["speed"]]
    mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
    return {"file_bytes": mean([e["edge"]["file_bytes"] for e in evs]),
            "peak_rss_bytes": mean([e["edge"]["peak_rss_bytes"] for e in evs]),
            "load_s": mean([e["edge"]["load_s"] for e in evs]), "threads": sp[0]["threads"] if sp else None,
            "prompt_tok_s": mean([x["prompt_tok_s"] for x in sp]), "gen_tok_s": mean([x["gen_tok_s"] for x in sp]),
            "fallback_tensors": evs[0]["model"].get("fallback_tensors")}


def edge_markdown(eg: EdgeGroup) -> list[str]:
    g = eg.group
    out = [f"### On the edge device (llama.cpp, CPU) · keep ratio {g.keep_ratio} · {g.train_examples} training "
           f"examples{adapter_header(g.adapter)}", "", accuracy_line(g.headline), "",
           "| model | type | seeds | acc [95% CI] | NLL | ECE | file MB | peak RSS MB | load s | tok/s prompt | "
           "tok/s generation | fallback tensors |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (key, t), m in eg.models.items():
        f = _edge_figures(eg.evals[(key, t)])
        acc = _mean_ci(m, "acc")
        acc_cell = "—" if acc is None else f"{acc[0]:.3f} [{acc[1]:.3f}, {acc[2]:.3f}]"
        num = lambda v, fmt: "—" if v is None else format(v, fmt)  # noqa: E731
        name = {"pruned": "pruned, before recovery", "teacher": "unpruned teacher"}.get(key, g.arm_name(key))
        out.append(f"| {name} | {t} | {'—' if m.seeds == [None] else _seeds(m.seeds)} | {acc_cell} | "
                   f"{num(mean_sd(m, 'nll')[0], '.3f')} | {num(mean_sd(m, 'ece')[0], '.3f')} | "
                   f"{f['file_bytes'] / 1e6:.2f} | {f['peak_rss_bytes'] / 1e6:.0f} | {f['load_s']:.2f} | "
                   f"{num(f['prompt_tok_s'], ',.0f')} | {num(f['gen_tok_s'], ',.0f')} | {f['fallback_tensors']} |")
    threads = {_edge_figures(evs)["threads"] for evs in eg.evals.values()}
    out += ["", f"tokens/s: llama.cpp at {', '.join(map(str, sorted(t for t in threads if t)))} thread(s), median of 3 "
            "(prompt: one batch; generation: one token per decode); peak RSS: the whole scoring process; "
            "fallback tensors: rows the type's blocks do not fit (another type was used, see the export manifest)."]
    return out + _comparisons_markdown(eg.comparisons, eg.notes) + [""]


def edge_csv(egs: list[EdgeGroup]) -> str:
    """edge.csv: one row per (model, type) with its CI and device figures, one per paired comparison."""
    rows = []
    for eg in egs:
        common = {"keep_ratio": eg.group.keep_ratio, "train_examples": eg.group.train_examples,
                  "n_questions": eg.group.n_answered, "accuracy": eg.group.headline}
        for (key, t), m in eg.models.items():
            row = {**common, "row_type": "model", "name": key, "type": t, **_edge_figures(eg.evals[(key, t)]),
                   "seeds": ";".join("" if s is None else str(s) for s in m.seeds)}
            for metric in DELTA_METRICS:
                row[f"{metric}_mean"] = mean_sd(m, metric)[0]
                if m.ci is not None:
                    row[f"{metric}_low"], row[f"{metric}_high"] = m.ci[metric].low, m.ci[metric].high
            rows.append(row)
        for c in eg.comparisons:
            row = {**common, "row_type": "comparison", "name": f"{c.a} − {c.b}", "seeds": ";".join(map(str, c.seeds))}
            for metric in DELTA_METRICS:
                iv = c.intervals[metric]
                row |= {f"{metric}_mean": iv.estimate, f"{metric}_low": iv.low, f"{metric}_high": iv.high}
            rows.append(row)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=EDGE_COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows([{k: r.get(k) for k in EDGE_COLUMNS} for r in rows])
    return buf.getvalue()


def _fit_accuracy_axis(ax, y_seen: list[float]) -> None:
    """The y range the data spans; chance is drawn only when it falls near it (a line at 0.2 would squeeze
    accuracies of 0.8-0.9 into a tenth of the plot)."""
    y_lo, y_hi = (min(y_seen), max(y_seen)) if y_seen else (0.0, 1.0)
    pad = max(0.02, (y_hi - y_lo) * 0.1)
    chance = 1 / len(LABELS)
    if chance >= y_lo - 3 * pad:
        ax.axhline(chance, color="lightgray", ls=":", label="chance")
        y_lo = min(y_lo, chance)
    ax.set_ylim(max(0.0, y_lo - pad), min(1.0, y_hi + pad))


def _plot_edge(egs: list[EdgeGroup], plt):
    """Accuracy against GGUF file size, one line per model through its types, per group; CI bars."""
    fig, axes = plt.subplots(1, len(egs), figsize=(6.4 * len(egs), 4.6), squeeze=False)
    for ax, eg in zip(axes[0], egs):
        x_seen, y_seen = [], []
        for key in EDGE_ORDER:
            pts = sorted((_edge_figures(eg.evals[k])["file_bytes"] / 1e6, _mean_ci(m, "acc"), k[1])
                         for k, m in eg.models.items() if k[0] == key and _mean_ci(m, "acc"))
            if not pts:
                continue
            color, marker = STYLE[key]
            label = {"pruned": "pruned, before recovery", "teacher": "unpruned teacher"}.get(key, ARM_NAMES.get(key))
            _with_interval(ax, [p[0] for p in pts], [p[1] for p in pts], marker + "-", color, label)
            x_seen += [p[0] for p in pts]
            y_seen += [v for p in pts for v in p[1]]
            for x, (y, _, _), t in pts:
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        _fit_accuracy_axis(ax, y_seen)
        wide = bool(x_seen) and max(x_seen) > 3 * min(x_seen)  # f16 .. q4 spans ~4x; one type across models a few %
        ax.set_xscale("log" if wide else "linear")
        ax.set_xlabel("GGUF file size, MB" + (" (log scale)" if wide else ""))
        ax.set_ylabel(accuracy_axis(eg.group.headline))
        score = "" if eg.group.score == BASELINE_SCORE else f", {eg.group.score}"
        ax.set_title(f"keep {eg.group.keep_ratio}{score}, {eg.group.train_examples} examples", fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"On the edge device: accuracy in llama.cpp against file size\n(bars: {BAND})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


# ---------------------------------------------------------------- entry point

def _baselines_of(g: Group, teacher: dict | None, pruned: list[dict]) -> dict[str, dict]:
    """The teacher and pruned evaluations that build_group took as this group's baselines."""
    found = {"teacher": teacher} if teacher else {}
    if "pruned" in g.models:
        found["pruned"] = next(ev for ev in pruned if ev["source"] in g.models["pruned"].sources)
    return found


def make_report(run_dirs: list[str], out_dir: str | Path, teacher_eval_path: str | None = None,
                pruned_eval_paths: list[str] = (), edge_paths: list[str] | None = None) -> tuple[str, list[dict]]:
    """Write report.md, report.csv and the PLOTS under out_dir (with GGUF evaluations at edge_paths, also the edge
    tables, edge.csv and EDGE_PLOT); returns (markdown, csv rows).
    `pruned_eval_paths`: evaluations of pruned checkpoints before recovery, one per keep ratio (and score) at most."""
    if not run_dirs:
        raise ReportError("no runs given: distill-dist report RUN_DIR [RUN_DIR ...]")
    runs = [load_run(d) for d in run_dirs]
    teacher = _load_baseline(teacher_eval_path, "report.teacher_eval")
    pruned = [_load_baseline(p, "report.pruned_eval") for p in pruned_eval_paths]
    by_key: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (-r["keep_ratio"], r["schedule"]["train_examples"], lora.label(r.get("adapter")), run_score(r))
        by_key.setdefault(key, []).append(r)
    members = {k: sorted(by_key[k], key=lambda r: r["run_dir"]) for k in sorted(by_key)}
    groups = [build_group(m, teacher, pruned) for m in members.values()]
    for g in groups[1:]:  # one accuracy per report: the overview and the plots put every group side by side
        _check_headline(groups[0].headline, {"headline": g.headline}, g.ref[0], groups[0].ref[0])
    studies = []
    for ratio_size in sorted({k[:3] for k in members}):  # (keep ratio, training examples, adapter)
        several = [(g, members[k]) for g, k in zip(groups, members) if k[:3] == ratio_size]
        if len(several) > 1:
            studies.append(build_study([g for g, _ in several], {g.score: m for g, m in several}))
    out_dir = Path(out_dir)
    md = to_markdown(groups, studies)
    rows = csv_rows(groups, studies)
    edge = load_edge_evals(edge_paths or [])
    run_fps = {fp for g in groups for fp in _edge_owners(g, {})} if edge else set()
    egs = [eg for g in groups if edge and (eg := build_edge_group(g, _baselines_of(g, teacher, pruned), edge, run_fps))
           is not None]
    if egs:
        md += "\n" + "\n".join(line for eg in egs for line in edge_markdown(eg))
        atomic_write_text(out_dir / EDGE_CSV, edge_csv(egs))
    atomic_write_text(out_dir / "report.md", md)
    atomic_write_text(out_dir / "report.csv", to_csv(rows))
    plot(groups, out_dir)
    if egs:
        _save_figure(_plot_edge(egs, _pyplot()), out_dir / EDGE_PLOT)
    return md, rows
