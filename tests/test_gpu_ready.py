"""What the GPU path needs and CPU can prove (issue 18): bf16 gradients accumulate in fp32 in a real
DeepSpeed engine; one host sync per optimizer step; no checkpoint at the last step and none kept after
the export; an iterative schedule frees each stage's engines; a replicated teacher gives the sharded
teacher's run. In-process runs on one rank (the same code as N ranks)."""
from __future__ import annotations

import gc
import json
from pathlib import Path

import psutil
import pytest
import torch
from conftest import make_teacher_and_student, make_tiny_model

from distill_dist import checkpoint, cli, engines, recipe, runtime, train
from distill_dist.config import load_config
from distill_dist.data import build_train_examples, collate, load_split
from distill_dist.losses import LossSpec
from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa

REPO = Path(__file__).resolve().parents[1]
NO_PERSIST = "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_ready")
    data, _ = make_teacher_and_student(root, n_train=64, n_dev=16, data_seed=5, model_seed=2, teacher_steps=20,
                                       keep=0.75)
    base = [f"model.path={root / 'teacher'}", f"train.student={root / 'pruned'}", f"data.path={data}",
            "data.max_length=64", "train.micro_batch_size=2", "train.warmup_steps=1", "train.save_every=0",
            "eval.limit=8", "eval.batch_size=8", f"output_dir={root}", NO_PERSIST]
    return {"root": root, "base": base}


def metrics(run_dir: Path) -> list[dict]:
    return checkpoint.read_metrics(Path(run_dir) / "metrics.jsonl")


# ---------------------------------------------------------------- fp32 gradient accumulation under bf16

def test_bf16_engine_accumulates_gradients_in_fp32(tmp_path):
    """The student config's data_types.grad_accum_dtype=fp32 reaches the engine (get_data_types), and 4
    micro-batches of bf16 gradients summed by ZeRO-3 match their exact sum to ~1e-8, where a bf16 buffer
    (DeepSpeed's default under bf16, the old config) is off by ~1e-2 of the largest entry."""
    from deepspeed.utils import safe_get_full_grad

    data = write_synthetic_csqa(tmp_path / "data", n_train=40, n_dev=4, n_test=2, seed=0)
    tok = train_tokenizer(data)
    make_tiny_model(tok).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    # lr 1e-30: the optimizer steps of the reference engine leave the bf16 weights as they are
    base = [f"data.path={data}", "data.max_length=64", "train.micro_batch_size=4", "train.lr=1e-30",
            "train.warmup_steps=0", "model.dtype=bfloat16", "train.arm=ce",
            f"train.ds_config={REPO / 'ds_configs/student_zero3.json'}"]
    rows = build_train_examples(tok, load_split(load_config(None, base).data, "train"), "ce", "answer", 64)
    batches = [collate(rows[i * 4:(i + 1) * 4], tok.pad_token_id, "cpu") for i in range(4)]

    def grads_after(grad_accum: int, accum_dtype: str | None) -> tuple[tuple, list[dict]]:
        over = [] if accum_dtype is None else [
            "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0, "
            f"data_types.grad_accum_dtype: {accum_dtype}}}"]
        cfg = load_config(None, base + [f"train.grad_accum={grad_accum}"] + (over or [NO_PERSIST]))
        engine = engines.student_engine(str(tmp_path / "model"), cfg, LossSpec("ce"))
        out = []
        for b in batches:
            b = dict(b)
            labels = b.pop("labels")
            engine.backward(engine(**b, labels=labels))
            if engine.is_gradient_accumulation_boundary():
                out.append({n: safe_get_full_grad(p).double() for n, p in engine.module.named_parameters()})
            engine.step()
        types = engine.get_data_types()
        engines.destroy(engine)
        return types, out

    runtime.init(1.0)
    try:
        types_ref, singles = grads_after(1, None)
        types_fp32, (fp32,) = grads_after(4, None)  # the config as shipped
        types_bf16, (bf16,) = grads_after(4, "bf16")  # DeepSpeed's default under bf16
    finally:
        runtime.shutdown(clean=True)
    assert types_fp32 == types_ref == (torch.bfloat16, torch.float32)
    assert types_bf16 == (torch.bfloat16, torch.bfloat16)
    exact = {n: sum(g[n] for g in singles) / 4 for n in singles[0]}  # x 1/4 is exact in bf16 (a power of 2)

    def error(g: dict) -> float:
        return max(float((g[n] - exact[n]).abs().max() / exact[n].abs().max()) for n in exact)

    print(f"relative error of the accumulated gradient: fp32 buffer {error(fp32):.2e}, bf16 buffer {error(bf16):.2e}")
    assert error(fp32) < 1e-6 < 1e-3 < error(bf16)


# ---------------------------------------------------------------- the loop: syncs, checkpoints, leaks

def test_one_host_sync_per_optimizer_step(setup, tmp_path, monkeypatch):
    """grad_accum 3 x 2 steps: the loop reduces and reads the device once per optimizer step, never per
    micro-step (the old loop: a .item() and an all-reduce for every micro-batch)."""
    calls = {"to_host": 0, "all_reduce": 0}
    to_host, all_reduce = runtime.all_reduce_to_host, runtime.all_reduce

    def count(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    def counting_train(self):
        monkeypatch.setattr(runtime, "all_reduce_to_host", count("to_host", to_host))
        monkeypatch.setattr(runtime, "all_reduce", count("all_reduce", all_reduce))
        try:
            return original_train(self)
        finally:
            monkeypatch.setattr(runtime, "all_reduce_to_host", to_host)
            monkeypatch.setattr(runtime, "all_reduce", all_reduce)

    original_train = recipe.RecoveryRecipe.train
    monkeypatch.setattr(recipe.RecoveryRecipe, "train", counting_train)
    run = tmp_path / "ce"
    assert cli.main(["train", *setup["base"], "train.arm=ce", "train.grad_accum=3", "train.max_steps=2",
                     "train.eval_after=false", f"train.output_dir={run}"]) == 0
    assert calls == {"to_host": 2, "all_reduce": 0}
    assert [m["step"] for m in metrics(run)] == [1, 2] and all(m["loss"] > 0 for m in metrics(run))


def test_final_step_writes_no_optimizer_state_and_a_rerun_only_evaluates(setup, tmp_path, monkeypatch):
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda engine, root, step, keep: (saved.append(step),
                                                                                real_save(engine, root, step, keep)))
    run = tmp_path / "ce"
    args = ["train", *setup["base"], "train.arm=ce", "train.max_steps=5", "train.save_every=2",
            "train.keep_checkpoints=1", f"train.output_dir={run}"]
    assert cli.main(args) == 0
    assert saved == [2, 4]  # periodic ones only: none at step 5, where the export is
    # After the export the run holds final/ (weights), exported.json (what a re-run needs to skip training),
    # metrics, eval, done.json -- and no checkpoint, no optimizer state anywhere.
    assert not (run / "checkpoints").exists()
    assert not list(run.rglob("*optim_states*"))
    assert json.loads((run / checkpoint.EXPORTED_FILE).read_text())["step"] == 5
    assert (run / "final" / "model.safetensors").is_file() and (run / "done.json").is_file()
    # Killed during evaluation (no done.json): the re-run evaluates the export and builds no engine.
    (run / "done.json").unlink()
    eval_before = json.loads((run / "eval" / "eval.json").read_text())["metrics"]
    monkeypatch.setattr(engines, "student_engine", lambda *a: pytest.fail("a re-run after the export retrained"))
    assert cli.main(args) == 0
    assert json.loads((run / "eval" / "eval.json").read_text())["metrics"] == eval_before
    assert len(metrics(run)) == 5 and (run / "done.json").is_file()


def _live_engines() -> int:
    from deepspeed import DeepSpeedEngine

    gc.collect()
    return sum(isinstance(o, DeepSpeedEngine) for o in gc.get_objects())


def test_three_stage_iterative_run_frees_each_stage(setup, tmp_path, monkeypatch):
    """KL live (a student and a teacher engine per stage), keep 0.75 -> 0.5 -> 0.25: after every stage no
    DeepSpeed engine is left alive, and no stage checkpoints its last step."""
    root = setup["root"]
    sched = ["prune.mode=iterative", "prune.schedule=[0.75,0.5,0.25]", f"prune.output_dir={tmp_path / 'pruned'}"]
    assert cli.main(["prune", f"model.path={root / 'teacher'}", *sched]) == 0
    saved, after = [], []
    real_save, real_run = checkpoint.save, train.run_training
    monkeypatch.setattr(checkpoint, "save", lambda engine, r, step, keep: (saved.append(step),
                                                                             real_save(engine, r, step, keep)))

    def run_stage(cfg):
        result = real_run(cfg)
        after.append((_live_engines(), psutil.Process().memory_info().rss))
        return result

    monkeypatch.setattr(train, "run_training", run_stage)
    base = [a for a in setup["base"] if not a.startswith("train.student=")]
    before = _live_engines()
    assert cli.main(["train", *base, *sched, "train.arm=kl", "train.max_steps=3", "train.save_every=2",
                     "train.eval_after=false", f"train.output_dir={tmp_path / 'kl'}"]) == 0
    print("live DeepSpeed engines / RSS after each stage:",
          ", ".join(f"{n} / {rss / 2**20:.0f} MiB" for n, rss in after))
    assert [n for n, _ in after] == [before] * 3
    assert saved == [2, 2, 2]


def test_replicated_teacher_gives_the_sharded_teachers_run(setup, tmp_path):
    runs = {}
    for placement in ("sharded", "replicated"):
        run = tmp_path / placement
        assert cli.main(["train", *setup["base"], "train.arm=kl", "train.max_steps=4", "train.grad_accum=2",
                         f"teacher.placement={placement}", "train.eval_after=false", f"train.output_dir={run}"]) == 0
        runs[placement] = metrics(run)
        report = json.loads((run / "sharding" / "rank0.json").read_text())
        assert json.loads((run / "run_meta.json").read_text())["teacher"]["placement"] == placement
        assert report["teacher_has_optimizer"] is False and report["teacher_requires_grad"] is False
    assert [m["loss"] for m in runs["replicated"]] == pytest.approx([m["loss"] for m in runs["sharded"]],
                                                                    rel=1e-6, abs=1e-9)
    assert [m["grad_norm"] for m in runs["replicated"]] == pytest.approx(
        [m["grad_norm"] for m in runs["sharded"]], rel=1e-5)


def test_demo_runs_no_more_ranks_than_gpus():
    """NCCL refuses two ranks on one GPU: on a 1-GPU machine the demo's arms run 1 rank; CPU (gloo) as asked."""
    from distill_dist.demo import demo_ranks

    assert demo_ranks(2, gpus=1) == 1 and demo_ranks(2, gpus=0) == 2 and demo_ranks(2, gpus=8) == 2


# ---------------------------------------------------------------- RNG state per rank's own device

class _FakeCuda:
    """CUDA generators of a node showing `visible` GPUs, for a machine without CUDA (no real CUDA RNG can run
    here): per-index states, and an IndexError for an index the node does not show, as torch raises."""

    def __init__(self, visible: int):
        self.visible = visible
        self.states = {i: torch.tensor([i, 7, 7], dtype=torch.uint8) for i in range(visible)}

    def _index(self, device) -> int:
        index = torch.device(device).index or 0
        if index >= self.visible:
            raise IndexError(f"cuda:{index} with {self.visible} visible GPUs")
        return index

    def get_rng_state(self, device="cuda"):
        return self.states[self._index(device)].clone()

    def set_rng_state(self, state, device="cuda"):
        self.states[self._index(device)] = state.clone()

    def get_rng_state_all(self):
        return [s.clone() for s in self.states.values()]

    def set_rng_state_all(self, states):
        for i, s in enumerate(states):
            self.set_rng_state(s, f"cuda:{i}")


def test_rng_file_holds_only_the_ranks_own_device_and_restores_on_a_node_showing_fewer_gpus(monkeypatch):
    """Rank 1 of a job saved on a node showing 4 GPUs (its device cuda:1) resumes on a node showing 2: the file
    holds one CUDA state (not one per visible GPU), and it lands on the rank's device there. The CUDA RNG
    calls are faked (no GPU here); python/numpy/torch's host generators are real and restored too."""
    import random

    import numpy as np

    saved_node = _FakeCuda(visible=4)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(saved_node, name))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: saved_node.visible)
    torch.manual_seed(11)
    state = checkpoint.rng_state(torch.device("cuda", 1))
    expected_draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    assert torch.equal(state["cuda"], torch.tensor([1, 7, 7], dtype=torch.uint8))  # a tensor, not a list of 4

    resumed_node = _FakeCuda(visible=2)
    for name in ("get_rng_state", "set_rng_state", "get_rng_state_all", "set_rng_state_all"):
        monkeypatch.setattr(torch.cuda, name, getattr(resumed_node, name))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: resumed_node.visible)
    checkpoint.set_rng_state(state, torch.device("cuda", 0))  # LOCAL_RANK 1 mod 2 visible -> cuda:1; 0 here too
    assert torch.equal(resumed_node.states[0], torch.tensor([1, 7, 7], dtype=torch.uint8))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_draws
    # An older file (every visible GPU's state) still restores the entry of the rank's device index...
    checkpoint.set_rng_state(dict(state, cuda=saved_node.get_rng_state_all()), torch.device("cuda", 1))
    assert torch.equal(resumed_node.states[1], torch.tensor([1, 7, 7], dtype=torch.uint8))
    # ...and a CPU rank saves no CUDA state at all.
    assert checkpoint.rng_state(torch.device("cpu"))["cuda"] is None
