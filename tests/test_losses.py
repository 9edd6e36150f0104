"""Recovery losses against float64 per-row references; chunked == naive in value and gradient."""
import math

import pytest
import torch

from distill_dist.losses import LOSSES, LossSpec, chunked_loss, naive_loss


def _reference(s_logits, t_logits, labels, spec):
    """Plain per-row float64 formulas, independent of the implementation."""
    s, t = s_logits.double(), None if t_logits is None else t_logits.double()
    tau = spec.temperature
    total = 0.0
    for i in range(s.shape[0]):
        ps = torch.softmax(s[i] / tau, -1)
        ce = -torch.log_softmax(s[i], -1)[labels[i]] if labels is not None else None
        if t is not None:
            pt = torch.softmax(t[i] / tau, -1)
            kl = (pt * (pt.log() - ps.log())).sum() * tau**2
            rkl = (ps * (ps.log() - pt.log())).sum() * tau**2
            b = spec.jsd_beta
            m = b * pt + (1 - b) * ps
            jsd = (b * (pt * (pt.log() - m.log())).sum() + (1 - b) * (ps * (ps.log() - m.log())).sum()) * tau**2
        val = {"ce": lambda: ce, "kl": lambda: kl, "reverse_kl": lambda: rkl, "jsd": lambda: jsd,
               "mixed": lambda: spec.alpha * ce + (1 - spec.alpha) * kl}[spec.kind]()
        total += float(val)
    return total / s.shape[0]


@pytest.fixture
def problem():
    g = torch.Generator().manual_seed(0)
    n, h, v = 29, 12, 41
    return {
        "hs": torch.randn(n, h, generator=g, dtype=torch.float64),
        "ht": torch.randn(n, h, generator=g, dtype=torch.float64),
        "ws": torch.randn(v, h, generator=g, dtype=torch.float64),
        "wt": torch.randn(v, h, generator=g, dtype=torch.float64),
        "y": torch.randint(0, v, (n,), generator=g),
    }


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_losses_match_float64_reference(problem, kind, tau):
    spec = LossSpec(kind=kind, temperature=tau, jsd_beta=0.3, alpha=0.4)
    s_logits, t_logits = problem["hs"] @ problem["ws"].T, problem["ht"] @ problem["wt"].T
    labels = problem["y"] if spec.needs_labels else None
    ref = _reference(s_logits, t_logits if spec.needs_teacher else None, labels, spec)
    got = naive_loss(s_logits, t_logits, labels, spec).item()
    assert got == pytest.approx(ref, rel=1e-10)
    assert ref > 0


@pytest.mark.parametrize("kind", LOSSES)
@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_equals_naive_value_and_gradient(problem, kind, dtype, rel):
    spec = LossSpec(kind=kind, temperature=2.0)
    labels = problem["y"] if spec.needs_labels else None

    def run(chunked):
        hs = problem["hs"].to(dtype).clone().requires_grad_(True)
        ws = problem["ws"].to(dtype).clone().requires_grad_(True)
        ht, wt = problem["ht"].to(dtype), problem["wt"].to(dtype)
        if chunked:
            loss = chunked_loss(hs, lambda h: h @ ws.T, spec, labels, ht, lambda h: h @ wt.T, chunk_size=7)
        else:
            loss = naive_loss(hs @ ws.T, ht @ wt.T, labels, spec)
        loss.backward()
        return loss.detach().double(), hs.grad.double(), ws.grad.double()

    (a, gha, gwa), (b, ghb, gwb) = run(True), run(False)
    assert a.item() == pytest.approx(b.item(), rel=rel)
    for x, y in ((gha, ghb), (gwa, gwb)):
        assert x.abs().max() > 0
        assert ((x - y).abs().max() / y.abs().max()).item() < rel * 10


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_divergence_is_zero_for_identical_models(problem, kind):
    w = problem["ws"]
    loss = chunked_loss(problem["hs"], lambda h: h @ w.T, LossSpec(kind=kind, temperature=1.7), None,
                        problem["hs"], lambda h: h @ w.T, chunk_size=5)
    assert abs(loss.item()) < 1e-12


def test_kl_is_a_true_divergence_not_teacher_cross_entropy(problem):
    """KL = CE(p_t, p_s) - H(p_t): check the entropy offset is really removed."""
    s, t = problem["hs"] @ problem["ws"].T, problem["ht"] @ problem["wt"].T
    pt = torch.softmax(t, -1)
    cross = -(pt * torch.log_softmax(s, -1)).sum(-1).mean()
    entropy = -(pt * pt.log()).sum(-1).mean()
    kl = naive_loss(s, t, None, LossSpec("kl"))
    assert kl.item() == pytest.approx((cross - entropy).item(), rel=1e-10)
    assert kl.item() < cross.item()


def test_label_free_losses_refuse_labels(problem):
    w = problem["ws"]
    with pytest.raises(ValueError, match="must not see labels"):
        chunked_loss(problem["hs"], lambda h: h @ w.T, LossSpec("kl"), problem["y"], problem["ht"], lambda h: h @ w.T)
    with pytest.raises(ValueError, match="needs labels"):
        chunked_loss(problem["hs"], lambda h: h @ w.T, LossSpec("ce"))


def test_teacher_gets_no_gradient(problem):
    ws = problem["ws"].clone().requires_grad_(True)
    wt = problem["wt"].clone().requires_grad_(True)
    hs = problem["hs"].clone().requires_grad_(True)
    chunked_loss(hs, lambda h: h @ ws.T, LossSpec("kl"), None, problem["ht"], lambda h: h @ wt.T).backward()
    assert wt.grad is None and ws.grad is not None and math.isfinite(ws.grad.abs().sum().item())
