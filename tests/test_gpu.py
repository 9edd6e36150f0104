"""CUDA-only checks (`pytest -m gpu`, run by bench/gpu_check.sh on a GPU node; skipped without CUDA): what no
CPU test can see. bf16 fused losses against float64, Liger's kernels on real Triton, a ZeRO-3 bf16 engine
on NCCL accumulating in fp32, pinned non-blocking batches, deterministic kernels repeating bit for bit."""
from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on a GPU node: bench/gpu_check.sh)")]

N, H, V = 512, 1024, 32768


def _problem(dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    return {"hs": torch.randn(N, H, generator=g) * 0.5, "ws": torch.randn(V, H, generator=g) / H ** 0.5,
            "ht": torch.randn(N, H, generator=g) * 0.5, "wt": torch.randn(V, H, generator=g) / H ** 0.5,
            "y": torch.randint(0, V, (N,), generator=g)}


@pytest.mark.parametrize("use", ["never", "always"])
@pytest.mark.parametrize("kind", ["kl", "ce"])
def test_bf16_fused_loss_tracks_float64(kind, use, monkeypatch):
    from distill_dist import losses
    from distill_dist.losses import DenseTeacher, LossSpec, fused_linear_loss

    if use == "always" and losses._liger_losses() is None:
        pytest.skip("liger-kernel not installed")
    monkeypatch.setattr(losses, "USE_LIGER", use)
    p, spec = _problem(), LossSpec(kind, temperature=2.0 if kind == "kl" else 1.0)
    a = p["hs"].cuda().bfloat16().requires_grad_(True)
    w = p["ws"].cuda().bfloat16().requires_grad_(True)
    t = DenseTeacher(p["ht"].cuda().bfloat16(), p["wt"].cuda().bfloat16())
    y = p["y"].cuda() if kind == "ce" else None
    loss = fused_linear_loss(a, w, spec, labels=y, teacher=t, chunk_size=128)
    loss.backward()
    ref = fused_linear_loss(a.detach().double().requires_grad_(True), w.detach().double(), spec, labels=y,
                            teacher=DenseTeacher(t.hidden.double(), t.weight.double()), chunk_size=128)
    assert loss.item() == pytest.approx(ref.item(), rel=2e-2)
    assert a.grad.dtype == w.grad.dtype == torch.bfloat16 and torch.isfinite(w.grad.float()).all()


def test_zero3_bf16_engine_on_nccl_accumulates_in_fp32(tmp_path):
    from conftest import make_tiny_model

    from distill_dist import engines, runtime
    from distill_dist.config import load_config
    from distill_dist.losses import LossSpec
    from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa

    data = write_synthetic_csqa(tmp_path / "d", n_train=16, n_dev=2, n_test=1, seed=0)
    tok = train_tokenizer(data)
    make_tiny_model(tok).save_pretrained(tmp_path / "m")
    cfg = load_config(None, [f"data.path={data}", "model.dtype=bfloat16", "train.grad_accum=2", "train.arm=ce"])
    rt = runtime.init(2.0)
    try:
        assert rt.backend == "nccl" and rt.device.type == "cuda"
        engine = engines.student_engine(str(tmp_path / "m"), cfg, LossSpec("ce"))
        assert engine.get_data_types() == (torch.bfloat16, torch.float32)
        engines.destroy(engine)
    finally:
        runtime.shutdown(clean=True)


def test_pinned_collate_gives_the_same_batch():
    from distill_dist.data import collate

    rows = [{"input_ids": [5, 6, 7], "positions": [2], "labels": [9]}, {"input_ids": [1, 2], "positions": [1], "labels": [3]}]
    a, b = collate(rows, 0, "cuda"), collate(rows, 0, "cpu")
    torch.cuda.synchronize()
    assert a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k]) for k in a)


def test_deterministic_kernels_repeat_the_sparse_target_gradient_bit_for_bit():
    """scatter_add_ with repeated draw ids (the cache target) is non-deterministic on CUDA unless
    train.deterministic sets torch.use_deterministic_algorithms."""
    from distill_dist import runtime
    from distill_dist.losses import LossSpec, SparseTeacher, fused_linear_loss

    runtime.set_deterministic(True)
    try:
        p = _problem()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (N, 96), generator=g).cuda()  # few distinct ids: many repeats per row
        st = SparseTeacher(ids, torch.full((N, 96), 1 / 96).cuda(), torch.zeros(N).cuda())
        grads = []
        for _ in range(2):
            a = p["hs"].cuda().requires_grad_(True)
            fused_linear_loss(a, p["ws"].cuda(), LossSpec("kl"), teacher=st, chunk_size=128).backward()
            grads.append(a.grad)
        assert torch.equal(grads[0], grads[1])
    finally:
        torch.use_deterministic_algorithms(False)


def test_tf32_switch_trades_float32_matmul_precision_for_speed():
    """train.tf32 on: a float32 matmul runs on TF32 tensor cores (inputs rounded to 10 mantissa bits: 2.9e-4
    of the largest entry at this size, emulated in float64 on CPU); off again (set both ways): full float32
    (3e-7 on CPU)."""
    from distill_dist import runtime

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1024, 1024, generator=g, dtype=torch.float64), torch.randn(1024, 1024, generator=g, dtype=torch.float64)
    exact = a @ b

    def rel_err() -> float:
        got = (a.float().cuda() @ b.float().cuda()).double().cpu()
        return float((got - exact).abs().max() / exact.abs().max())

    try:
        runtime.set_tf32(True, torch.device("cuda"))
        tf32 = rel_err()
        runtime.set_tf32(False, torch.device("cuda"))
        fp32 = rel_err()
    finally:
        runtime.set_tf32(False, torch.device("cuda"))
    assert fp32 < 1e-5 and 5e-5 < tf32 < 1e-2, (fp32, tf32)
