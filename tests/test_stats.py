"""Paired statistics against textbook cases: exact McNemar, bootstrap vs normal theory, verdict wording."""
import math

import numpy as np
import pytest

from distill_dist import stats
from distill_dist.evaluate import metrics_from_logliks


def _mcnemar_reference(b: int, c: int) -> float:
    """Two-sided exact McNemar p: 2 * P(X <= min(b, c)), X ~ Binomial(b + c, 1/2), capped at 1 (float64)."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2.0 ** n)


def _pair(b: int, c: int, both: int = 30, neither: int = 20) -> tuple[np.ndarray, np.ndarray]:
    a = np.array([1] * b + [0] * c + [1] * both + [0] * neither, bool)
    y = np.array([0] * b + [1] * c + [1] * both + [0] * neither, bool)
    return a, y


@pytest.mark.parametrize("b,c", [(10, 2), (2, 10), (15, 5), (7, 7), (0, 6), (25, 40), (1, 0)])
def test_mcnemar_exact_matches_the_binomial_formula(b, c):
    t = stats.mcnemar_exact(*_pair(b, c))
    assert (t.b, t.c) == (b, c)
    assert t.p == pytest.approx(_mcnemar_reference(b, c), rel=1e-12)


def test_mcnemar_known_values_and_no_discordance():
    assert stats.mcnemar_exact(*_pair(10, 2)).p == pytest.approx(79 / 2048, rel=1e-12)  # 2 * (1 + 12 + 66) / 2^12
    assert stats.mcnemar_exact(*_pair(0, 6)).p == pytest.approx(1 / 32, rel=1e-12)
    assert stats.mcnemar_exact(*_pair(0, 0)).p == 1.0


def test_mcnemar_per_pair_pairs_rows_and_broadcasts_one_baseline():
    a1, y1 = _pair(10, 2)
    a2, y2 = _pair(3, 9)
    conf = np.full(len(a1), 0.5)
    pq = lambda rows: stats.PerQuestion(np.array(rows, float), *(np.zeros((len(rows), len(a1))),) * 3,
                                        np.tile(conf, (len(rows), 1)))
    tests = stats.mcnemar_per_pair(pq([a1, a2]), pq([y1, y2]))
    assert [(t.b, t.c) for t in tests] == [(10, 2), (3, 9)]
    tests = stats.mcnemar_per_pair(pq([a1, a2]), pq([y1]))
    assert [(t.b, t.c) for t in tests] == [(10, 2), ((a2 & ~y1).sum(), (~a2 & y1).sum())]


def _model(rng, s: int, q: int, acc: float, gold=None) -> stats.PerQuestion:
    gold = rng.integers(0, 5, q) if gold is None else gold
    logits = rng.normal(size=(s, q, 5))
    logits[np.arange(s)[:, None], np.arange(q)[None], gold[None]] += np.where(rng.random((s, q)) < acc, 4.0, -4.0)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return stats.PerQuestion.from_probs(p / p.sum(-1, keepdims=True), gold)


def test_per_question_metrics_match_the_evaluator():
    rng = np.random.default_rng(3)
    logliks, gold = rng.normal(size=(300, 5)) * 2, rng.integers(0, 5, 300)
    p = np.exp(logliks - logliks.max(1, keepdims=True))
    pq = stats.PerQuestion.from_probs((p / p.sum(1, keepdims=True))[None], gold)
    ref, _ = metrics_from_logliks(logliks, gold)
    got = {"acc": pq.correct.mean(), "nll": pq.nll.mean(), "brier": pq.brier.mean(), "entropy": pq.entropy.mean(),
           "ece": stats.ece(pq.correct[0], pq.conf[0])[0]}
    for k, v in got.items():
        assert v == pytest.approx(ref[k], rel=1e-12, abs=1e-14), k


def test_weighted_ece_equals_ece_of_the_repeated_sample():
    rng = np.random.default_rng(4)
    correct, conf = (rng.random(50) < 0.6).astype(float), rng.uniform(0.2, 1.0, 50)
    counts = rng.integers(0, 4, 50)
    rep = np.repeat(np.arange(50), counts)
    assert stats.ece(correct, conf, counts[None].astype(float))[0] == pytest.approx(
        stats.ece(correct[rep], conf[rep])[0], rel=1e-12)


@pytest.mark.parametrize("metric", ["acc", "nll"])
def test_bootstrap_ci_of_a_mean_difference_matches_normal_theory(metric):
    """Large sample, one seed: percentile CI ≈ mean(d) ± 1.96 sd(d)/√Q. Tolerance 0.25 standard errors
    (the Monte-Carlo sd of a 2.5 % quantile from 2000 replicates is ≈ 0.06 se)."""
    rng = np.random.default_rng(5)
    gold = rng.integers(0, 5, 6000)
    a, b = _model(rng, 1, 6000, 0.62, gold), _model(rng, 1, 6000, 0.58, gold)
    field = {"acc": "correct", "nll": "nll"}[metric]
    d = (getattr(a, field) - getattr(b, field))[0]
    se = d.std(ddof=1) / math.sqrt(len(d))
    iv = stats.bootstrap(a, b)[metric]
    assert iv.estimate == pytest.approx(d.mean(), abs=1e-12)
    assert abs(iv.low - (d.mean() - 1.959964 * se)) < 0.25 * se
    assert abs(iv.high - (d.mean() + 1.959964 * se)) < 0.25 * se


def test_zero_difference_gives_an_interval_around_zero_and_no_verdict_sign():
    rng = np.random.default_rng(6)
    gold = rng.integers(0, 5, 400)
    a = _model(rng, 1, 400, 0.6, gold)
    b = stats.PerQuestion(a.correct[:, ::-1].copy(), a.nll, a.brier, a.entropy, a.conf)  # same count, other questions
    iv = stats.bootstrap(a, b)["acc"]
    assert iv.estimate == 0 and iv.low < 0 < iv.high and not iv.significant
    text = stats.verdict("KL", "CE", "acc", iv)
    assert text.endswith("not significant at 0.05") and "higher" not in text and "lower" not in text
    same = stats.bootstrap(a, a)
    assert all((iv.estimate, iv.low, iv.high) == (0, 0, 0) and not iv.significant for iv in same.values())


def test_clear_difference_gives_its_sign():
    rng = np.random.default_rng(7)
    gold = rng.integers(0, 5, 500)
    good, bad = _model(rng, 2, 500, 0.8, gold), _model(rng, 2, 500, 0.5, gold)
    up, down = stats.bootstrap(good, bad)["acc"], stats.bootstrap(bad, good)["acc"]
    assert up.low > 0.2 and down.high < -0.2
    assert stats.verdict("KL", "CE", "acc", up).endswith("KL higher, significant at 0.05")
    assert stats.verdict("KL", "CE", "acc", down).endswith("KL lower, significant at 0.05")


def test_seed_noise_widens_the_interval():
    """Per-seed shifts of NLL with no question-level spread: only seed resampling can make the CI wide."""
    rng = np.random.default_rng(8)
    b = _model(rng, 4, 300, 0.6)
    shift = np.array([0.3, -0.2, 0.25, -0.25])[:, None]
    a = stats.PerQuestion(b.correct, b.nll + shift, b.brier, b.entropy, b.conf)
    iv = stats.bootstrap(a, b)["nll"]
    assert iv.estimate == pytest.approx(shift.mean(), abs=1e-12)
    assert iv.low < 0 < iv.high and iv.low >= -0.25 - 1e-12 and iv.high <= 0.3 + 1e-12
    one = stats.bootstrap(a.seeds([0]), b.seeds([0]))["nll"]
    assert one.low == pytest.approx(0.3, abs=1e-12) and one.high == pytest.approx(0.3, abs=1e-12)


def test_bootstrap_is_deterministic_and_seeded():
    rng = np.random.default_rng(9)
    gold = rng.integers(0, 5, 300)
    a, b = _model(rng, 2, 300, 0.6, gold), _model(rng, 1, 300, 0.55, gold)
    assert stats.bootstrap(a, b) == stats.bootstrap(a, b)
    assert stats.bootstrap(a, b)["acc"] != stats.bootstrap(a, b, seed=1)["acc"]
    with pytest.raises(ValueError, match="cannot pair"):
        stats.bootstrap(a, _model(rng, 1, 299, 0.5))


@pytest.mark.parametrize("iv,text", [
    (stats.Interval(0.013, -0.004, 0.030), "KL − CE = +1.3 pts [−0.4, +3.0], not significant at 0.05"),
    (stats.Interval(0.013, 0.004, 0.030), "KL − CE = +1.3 pts [+0.4, +3.0], KL higher, significant at 0.05"),
    (stats.Interval(0.013, 0.0, 0.030), "KL − CE = +1.3 pts [+0.0, +3.0], not significant at 0.05"),
])
def test_verdict_wording(iv, text):
    assert stats.verdict("KL", "CE", "acc", iv) == text


def test_verdict_for_nll_uses_raw_units():
    iv = stats.Interval(-0.021, -0.040, -0.003)
    expected = "KL − CE NLL = −0.021 [−0.040, −0.003], KL lower, significant at 0.05"
    assert stats.verdict("KL", "CE", "nll", iv) == expected
