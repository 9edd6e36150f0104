"""Paired statistics for two models scored on the same questions: bootstrap CIs, exact McNemar, verdicts.

Why paired: both arms answer the same questions, so most question-to-question variation cancels in
the per-question difference; an unpaired comparison of two accuracies would be far wider.

Bootstrap scheme (two-way, "pigeonhole"): a model is S seeds x Q questions. Each replicate draws Q
questions with replacement (one draw shared by every seed, since a question is the same item in every
seed) and, when S > 1, S seed pairs with replacement; the replicate statistic is the mean over the
drawn seed pairs of (metric of A - metric of B) on the drawn questions. ECE is recomputed from the
resampled questions each time (it is not a per-question mean). Resampling both factors keeps seed
noise (training randomness) and question noise (finite test set) in the interval; with one seed only
question noise is measured, which the report says. The 95 % interval is the percentile interval.

McNemar: exact two-sided binomial test (scipy.stats.binomtest, p = 1/2) on the discordant questions,
one test per seed pair. Not pooled over pairs: the same question in two seed pairs is not an
independent observation, and a pooled count would overstate significance.

Fixed generator seed: the same inputs give the same intervals, byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest

from .evaluate import ECE_BINS, confidence_bins

N_BOOT = 2000
BOOT_SEED = 0
LEVEL = 0.95
MEAN_METRICS = {"acc": "correct", "nll": "nll", "brier": "brier", "entropy": "entropy"}  # metric: per-question field
METRICS = ("acc", "nll", "brier", "ece", "entropy")
LABELS = {"acc": "acc", "nll": "NLL", "brier": "Brier", "ece": "ECE", "entropy": "entropy"}
_CHUNK = 256  # replicates per resampling block: bounds memory at _CHUNK x Q weights


@dataclass(frozen=True)
class PerQuestion:
    """Per-question results of one model, [S seeds, Q questions] each, questions in the same order for
    every model being compared."""
    correct: np.ndarray  # 1.0 where the prediction is the gold answer
    nll: np.ndarray  # -log p(gold)
    brier: np.ndarray  # sum over choices of (p - onehot(gold))^2
    entropy: np.ndarray  # entropy of the choice distribution (nats)
    conf: np.ndarray  # max choice probability, for ECE

    @classmethod
    def from_probs(cls, probs: np.ndarray, gold: np.ndarray, pred: np.ndarray | None = None) -> "PerQuestion":
        """probs [S, Q, C], gold [Q] choice indices, pred [S, Q] (default argmax of probs)."""
        probs = np.asarray(probs, dtype=np.float64)
        gold = np.asarray(gold, dtype=np.int64)
        pred = probs.argmax(-1) if pred is None else np.asarray(pred)
        onehot = np.eye(probs.shape[-1])[gold][None]
        p_gold = np.take_along_axis(probs, np.broadcast_to(gold[None, :, None], probs.shape[:2] + (1,)), -1)[..., 0]
        return cls(correct=(pred == gold[None]).astype(np.float64), nll=-np.log(p_gold),
                   brier=((probs - onehot) ** 2).sum(-1),
                   entropy=-(probs * np.log(np.clip(probs, 1e-300, None))).sum(-1), conf=probs.max(-1))

    @property
    def shape(self) -> tuple[int, int]:
        return self.correct.shape

    def seeds(self, index: list[int]) -> "PerQuestion":
        """The same questions for a subset of seeds (rows)."""
        return PerQuestion(*(getattr(self, f)[index] for f in ("correct", "nll", "brier", "entropy", "conf")))


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (a bound exactly at 0 does not)."""
        return self.low > 0 or self.high < 0


@dataclass(frozen=True)
class McNemar:
    b: int  # A right, B wrong
    c: int  # A wrong, B right
    p: float


def ece(correct: np.ndarray, conf: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """ECE over ECE_BINS bins for each row of question weights [R, Q] (a bootstrap count per question).

    sum_b |acc_b - conf_b| * n_b / N equals sum_b |sum_{i in b} (correct_i - conf_i)| / N, which turns a
    weighted ECE into one matrix product."""
    weights = np.ones((1, len(conf))) if weights is None else weights
    gap = np.zeros((len(conf), ECE_BINS))
    gap[np.arange(len(conf)), confidence_bins(conf)] = correct - conf
    return np.abs(weights @ gap).sum(1) / weights.sum(1)


def _resample_counts(rng: np.random.Generator, rows: int, n: int) -> np.ndarray:
    """[rows, n]: how often each of n items is drawn in each of `rows` draws of n with replacement."""
    idx = rng.integers(0, n, size=(rows, n)) + n * np.arange(rows)[:, None]
    return np.bincount(idx.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def _per_seed(a: PerQuestion, b: PerQuestion | None, weights: np.ndarray) -> dict[str, np.ndarray]:
    """{metric: [R, S]} of metric(a) - metric(b) per seed pair under question weights [R, Q]."""
    s_a = a.shape[0]
    out = {}
    for m, f in MEAN_METRICS.items():
        vals = getattr(a, f) - (getattr(b, f) if b is not None else 0.0)  # b broadcasts when it has 1 seed
        out[m] = weights @ np.broadcast_to(vals, a.shape).T / weights.sum(1, keepdims=True)
    eces = []
    for s in range(s_a):
        e = ece(a.correct[s], a.conf[s], weights)
        if b is not None:
            sb = s if b.shape[0] == s_a else 0
            e = e - ece(b.correct[sb], b.conf[sb], weights)
        eces.append(e)
    out["ece"] = np.stack(eces, 1)
    return out


def bootstrap(a: PerQuestion, b: PerQuestion | None = None, n_boot: int = N_BOOT, seed: int = BOOT_SEED,
              level: float = LEVEL) -> dict[str, Interval]:
    """Percentile CI of metric(a) - metric(b) (or of metric(a) alone when b is None) for every metric.

    a is [S, Q]; b is [S, Q] (row s paired with a's row s) or [1, Q] (one model paired with every seed)."""
    s_n, q_n = a.shape
    if b is not None and (b.shape[1] != q_n or b.shape[0] not in (1, s_n)):
        raise ValueError(f"cannot pair a {a.shape} with b {b.shape}: same questions, and 1 or {s_n} seeds")
    rng = np.random.default_rng(seed)
    seed_w = _resample_counts(rng, n_boot, s_n) if s_n > 1 else np.ones((n_boot, 1))
    reps = {m: np.empty(n_boot) for m in METRICS}
    for start in range(0, n_boot, _CHUNK):
        q_w = _resample_counts(rng, min(_CHUNK, n_boot - start), q_n)
        sw = seed_w[start: start + len(q_w)]
        for m, v in _per_seed(a, b, q_w).items():
            reps[m][start: start + len(q_w)] = (v * sw).sum(1) / s_n
    full = _per_seed(a, b, np.ones((1, q_n)))
    tails = [(1 - level) / 2, 1 - (1 - level) / 2]
    return {m: Interval(float(full[m].mean()), *(float(x) for x in np.quantile(reps[m], tails))) for m in METRICS}


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> McNemar:
    """Exact McNemar test: under H0 each discordant question favours A with probability 1/2."""
    a_ok, b_ok = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    b, c = int((a_ok & ~b_ok).sum()), int((~a_ok & b_ok).sum())
    p = 1.0 if b + c == 0 else float(binomtest(b, b + c, 0.5, alternative="two-sided").pvalue)
    return McNemar(b, c, p)


def mcnemar_per_pair(a: PerQuestion, b: PerQuestion) -> list[McNemar]:
    """One exact test per seed pair (row s of a with row s of b, or with b's only row)."""
    return [mcnemar_exact(a.correct[s], b.correct[s if b.shape[0] == a.shape[0] else 0]) for s in range(a.shape[0])]


def _signed(x: float, digits: int) -> str:
    s = f"{x:+.{digits}f}"
    return s.replace("-", "\u2212")


def format_interval(metric: str, iv: Interval) -> str:
    """'+1.3 pts [−0.4, +3.0]' for accuracy (percentage points), '−0.021 [−0.040, −0.003]' otherwise."""
    scale, digits, unit = (100.0, 1, " pts") if metric == "acc" else (1.0, 3, "")
    lo, hi = _signed(iv.low * scale, digits), _signed(iv.high * scale, digits)
    return f"{_signed(iv.estimate * scale, digits)}{unit} [{lo}, {hi}]"


def verdict(a_name: str, b_name: str, metric: str, iv: Interval, level: float = LEVEL) -> str:
    """A sentence that claims a direction only when the interval excludes 0."""
    label = "" if metric == "acc" else f" {LABELS[metric]}"
    head = f"{a_name} \u2212 {b_name}{label} = {format_interval(metric, iv)}"
    alpha = f"{1 - level:.2g}"
    if not iv.significant:
        return f"{head}, not significant at {alpha}"
    return f"{head}, {a_name} {'higher' if iv.low > 0 else 'lower'}, significant at {alpha}"
