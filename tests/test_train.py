"""Recovery training: real DeepSpeed ZeRO-3 on 2 CPU ranks (gloo) vs the same code on 1 rank and vs an
independent plain-torch reference loop (here, in the test), the uneven-chunk case that used to deadlock,
sharding, exact resume after a signal, export, NaN and mismatch errors. Multi-rank tests run torchrun."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_teacher_and_student, rank_processes
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from distill_dist import cli
from distill_dist.config import TinyModelConfig, load_config
from distill_dist.data import build_train_examples, load_split
from distill_dist.models import build_tiny_model
from distill_dist.prune import prune_checkpoint
from distill_dist.runtime import free_port
from distill_dist.synthetic import train_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    data, _ = make_teacher_and_student(root, n_train=200, n_dev=40, data_seed=3, model_seed=1, teacher_steps=150)
    base = [f"model.path={root / 'teacher'}", f"train.student={root / 'pruned'}", f"data.path={data}",
            "data.max_length=64", "train.micro_batch_size=2", "train.lr=1e-4", "train.warmup_steps=2",
            "train.save_every=0", "eval.limit=16", "eval.batch_size=16", f"output_dir={root}",
            "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}",
            f"train.ds_config={REPO / 'ds_configs/student_zero3.json'}",
            f"train.teacher_ds_config={REPO / 'ds_configs/teacher_zero3_inference.json'}"]
    return {"root": root, "data": data, "base": base}


def torchrun(args, nproc=2, wait=True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "distill_dist.cli", "train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


STEPS = 40


@pytest.fixture(scope="module")
def zero3_run(setup):
    """The uninterrupted 2-rank ZeRO-3 KL run that several tests compare against."""
    run = setup["root"] / "zero3_kl"
    torchrun(setup["base"] + ["train.arm=kl", f"train.max_steps={STEPS}", f"train.output_dir={run}"])
    return run


def reference_losses(setup, steps: int, grad_accum: int = 2, micro: int = 2) -> list[float]:
    """An independent plain-torch loop (no DeepSpeed, one process): the product's data order, loss module,
    optimizer groups and LR schedule, with torch's own clipping and AdamW step."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    from distill_dist.data import collate
    from distill_dist.engines import StudentWithLoss, _param_groups
    from distill_dist.losses import DenseTeacher, LossSpec
    from distill_dist.models import load_causal_lm, load_tokenizer
    from distill_dist.recipe import micro_slice, step_indices

    cfg = load_config(None, setup["base"])
    tok = load_tokenizer(str(setup["root"] / "pruned"))
    examples = build_train_examples(tok, load_split(cfg.data, "train"), "kl", "answer", 64)
    student = StudentWithLoss(load_causal_lm(str(setup["root"] / "pruned")).train(), LossSpec("kl"), 1024)
    teacher = load_causal_lm(str(setup["root"] / "teacher"))
    opt = torch.optim.AdamW(_param_groups(student, 0.0), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, 2, STEPS, min_lr_rate=0.1)
    losses = []
    for step in range(steps):
        rows_of_step = step_indices(len(examples), step, micro * grad_accum, 0)
        total = 0.0
        for m in range(grad_accum):
            b = collate([examples[i] for i in micro_slice(rows_of_step, m, 0, 1, micro)], tok.pad_token_id, "cpu")
            with torch.no_grad():
                h_t = teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            loss = student(**b, teacher=DenseTeacher(h_t[b["rows"], b["cols"]], teacher.lm_head.weight))
            (loss / grad_accum).backward()
            total += loss.item() / grad_accum
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


@pytest.mark.multirank
def test_zero3_two_ranks_equals_one_rank_and_a_plain_reference(setup, zero3_run):
    ref = setup["root"] / "one_rank_kl"
    # world 2 x accum 1 == world 1 x accum 2: same rows, same mean-of-means loss; one rank is the same code.
    assert cli.main(["train"] + setup["base"] + ["train.arm=kl", f"train.max_steps={STEPS}", "train.grad_accum=2",
                                                 f"train.output_dir={ref}"]) == 0
    a, b = metrics(zero3_run), metrics(ref)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    assert a[0]["loss"] > 0
    # Tolerance: fp32 reduction order differs (reduce-scatter vs local sum), and a KL of ~1e-3 is a
    # difference of log-probs of ~-6, so its float32 rounding is ~1e-7 absolute per term.
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=2e-6)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-12)
    plain = reference_losses(setup, 8)
    for x, y in zip(a, plain):
        assert x["loss"] == pytest.approx(y, rel=1e-4, abs=2e-6)
    first, last = (sum(m["loss"] for m in part) / 10 for part in (a[:10], a[-10:]))
    assert last < first, (first, last)  # it learns
    wa, wb = load_file(zero3_run / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    start = load_file(setup["root"] / "pruned" / "model.safetensors")
    assert any(not torch.equal(start[k], wa[k]) for k in wa)  # training really changed the weights


@pytest.mark.multirank
def test_uneven_chunk_counts_across_ranks_do_not_deadlock(setup):
    """positions=all with chunk_size=5: the ranks supervise different numbers of positions (so different
    chunk counts) every step. The head is gathered once per micro-step on every rank, so this finishes
    (it used to hang at step 0) and equals one rank."""
    args = setup["base"] + ["train.arm=kl", "train.positions=all", "train.chunk_size=5", "train.max_steps=4",
                            "train.eval_after=false"]
    two, one = setup["root"] / "uneven2", setup["root"] / "uneven1"
    torchrun(args + [f"train.output_dir={two}"])
    assert cli.main(["train"] + args + ["train.grad_accum=2", f"train.output_dir={one}"]) == 0
    cfg = load_config(None, setup["base"])
    tok = train_tokenizer(setup["data"])
    ex = build_train_examples(tok, load_split(cfg.data, "train"), "kl", "all", 64)
    from distill_dist.recipe import micro_slice, step_indices

    rows = step_indices(len(ex), 0, 4, 0)
    counts = [sum(len(ex[i]["positions"]) for i in micro_slice(rows, 0, r, 2, 2)) for r in (0, 1)]
    assert -(-counts[0] // 5) != -(-counts[1] // 5), counts  # the case really is uneven
    for x, y in zip(metrics(two), metrics(one)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=2e-6)
    assert len(metrics(two)) == 4


@pytest.mark.multirank
def test_teacher_and_student_are_partitioned(zero3_run):
    reports = [json.loads((zero3_run / "sharding" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rep in reports:
        assert rep["world_size"] == 2
        assert rep["student_has_optimizer"] is True
        assert rep["teacher_has_optimizer"] is False and rep["teacher_requires_grad"] is False
        for which in ("student", "teacher"):
            for name, (local, full) in rep[which].items():
                assert local == -(-full // 2), f"{which} {name}: holds {local} of {full}"
    assert reports[0]["teacher"]["lm.lm_head.weight"][1] > 1000


def usr1_after_steps(proc, run: Path, steps: int) -> list:
    """SIGUSR1 (the preemption notice) to every rank of a running torchrun job once `steps` steps are logged;
    the signalled ranks (empty if the job ended first)."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").is_file() and len(metrics(run)) >= steps:
            workers = rank_processes(proc.pid)
            for w in workers:
                w.send_signal(signal.SIGUSR1)
            return workers
        time.sleep(0.02)
    return []


@pytest.mark.multirank
def test_signal_then_resume_reproduces_uninterrupted_losses(setup, zero3_run):
    run = setup["root"] / "resumed_kl"
    args = setup["base"] + ["train.arm=kl", f"train.max_steps={STEPS}", f"train.output_dir={run}"]
    proc = torchrun(args, wait=False)
    workers = usr1_after_steps(proc, run, 3)
    out, _ = proc.communicate(timeout=300)
    assert workers, out[-3000:]
    lines = metrics(run)
    assert 3 <= len(lines) < STEPS, "the signal should stop the run early"
    assert not (run / "done.json").exists()
    assert "exiting with 75" in out
    torchrun(args)  # resumes from the checkpoint written on the signal
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(zero3_run)]  # bit for bit
    assert [m["grad_norm"] for m in metrics(run)] == [m["grad_norm"] for m in metrics(zero3_run)]
    assert (run / "done.json").is_file()


def test_ce_arm_exports_a_standard_checkpoint_and_is_idempotent(setup, capsys):
    run = setup["root"] / "plain_ce"
    args = setup["base"] + ["train.arm=ce", "train.max_steps=3", "train.save_every=2",
                            f"train.output_dir={run}"]
    assert cli.main(["train"] + args) == 0
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert model.config.intermediate_size == 32
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (32, 32)
    done = json.loads((run / "done.json").read_text())
    assert done["arm"] == "ce" and done["teacher"]["source"] == "none"
    written = json.loads((run / "eval" / "eval.json").read_text())["metrics"]
    assert done["eval"] == written and written["n"] == 16  # eval.limit=16, scored on the exported model
    meta = json.loads((run / "run_meta.json").read_text())
    assert meta["plan_sha256"] == json.loads((setup["root"] / "pruned" / "pruning_plan.json").read_text())["plan_sha256"]
    rec = metrics(run)[0]
    assert set(rec) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_memory_bytes"}
    capsys.readouterr()
    assert cli.main(["train"] + args) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_nan_loss_stops_with_clear_error_keeping_last_checkpoint(setup, capsys):
    run = setup["root"] / "nan"
    code = cli.main(["train"] + setup["base"] + ["train.arm=ce", "train.max_steps=20", "train.lr=1e30",
                                     "train.warmup_steps=0", "train.grad_clip=0", "train.save_every=1",
                                     f"train.output_dir={run}"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("distill-dist")]  # tqdm shares stderr
    assert code == 3
    assert len(err) == 1 and "error: non-finite loss" in err[0] and "last good checkpoint" in err[0]
    latest = (run / "checkpoints" / "latest_complete").read_text().strip()
    assert (run / "checkpoints" / latest / "COMPLETE").is_file()
    assert not (run / "done.json").exists()


def test_vocab_mismatch_and_foreign_teacher_are_refused(setup, tmp_path, capsys):
    tok = train_tokenizer(setup["data"])
    other = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=128, num_heads=2, num_kv_heads=2,
                                             vocab_size=1024, seed=5), tok)
    other.save_pretrained(tmp_path / "big_vocab")
    code = cli.main(["train"] + setup["base"] + ["train.arm=kl", f"model.path={tmp_path / 'big_vocab'}",
                                     f"train.output_dir={tmp_path / 'r1'}"])
    err = capsys.readouterr().err
    assert code == 2 and "vocab_size 1024" in err and "same vocabulary" in err
    same_shape = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=128, num_heads=2, num_kv_heads=2,
                                                  seed=99), tok)
    same_shape.save_pretrained(tmp_path / "other_teacher")
    code = cli.main(["train"] + setup["base"] + ["train.arm=kl", f"model.path={tmp_path / 'other_teacher'}",
                                     f"train.output_dir={tmp_path / 'r2'}"])
    assert code == 2 and "not the checkpoint the student was pruned from" in capsys.readouterr().err


def _rotated_answers(data: Path, out: Path) -> Path:
    """A copy of the jsonl splits with every answer key moved to the next letter (E to A)."""
    out.mkdir()
    for f in Path(data).iterdir():
        rows = [json.loads(l) for l in f.read_text().splitlines()]
        for r in rows:
            if r.get("answerKey"):
                r["answerKey"] = "ABCDE"[("ABCDE".index(r["answerKey"]) + 1) % 5]
        (out / f.name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


@pytest.mark.parametrize("fmt", ["mc", "cloze"])
def test_rotated_answer_keys_leave_the_kl_arm_bit_identical(refusal_env, tmp_path, fmt):
    """The KL arm's rows never read the answer (cloze: every choice packed after the prompt), so with every key
    rotated its loss curve and gradient norms are the same bits; CE's change."""
    rotated = _rotated_answers(refusal_env["data"], tmp_path / "rotated")
    cfg = load_config(None, refusal_env["base"] + [f"data.format={fmt}"])
    gold = load_split(cfg.data, "train")["answer"]
    cfg.data.path = str(rotated)
    assert all(b == (a + 1) % 5 for a, b in zip(gold, load_split(cfg.data, "train")["answer"]))
    if fmt == "cloze":
        rows = build_train_examples(refusal_env["tok"], load_split(cfg.data, "train"), "kl", "answer", 64, fmt=fmt)
        assert any(sum(r["blocks"]) for r in rows), "packed rows with multi-token choices"
    curves = {}
    for arm in ("kl", "ce"):
        for name, data in (("gold", refusal_env["data"]), ("rotated", rotated)):
            run = tmp_path / f"{arm}_{name}"
            assert cli.main(["train", *refusal_env["base"], f"data.format={fmt}", f"train.arm={arm}",
                             "train.max_steps=3", "train.save_every=0", f"data.path={data}",
                             f"train.output_dir={run}"]) == 0
            curves[arm, name] = [(m["loss"], m["grad_norm"]) for m in metrics(run)]
    assert len(curves["kl", "gold"]) == 3 and curves["kl", "gold"][0][0] > 0
    assert curves["kl", "gold"] == curves["kl", "rotated"]
    assert all(a[0] != b[0] for a, b in zip(curves["ce", "gold"], curves["ce", "rotated"]))


@pytest.mark.skipif(not (SHARED / "models" / "TinyStories-656K").is_dir(), reason="../shared/data absent")
def test_tinystories_kl_recovery_lowers_heldout_kl(tmp_path):
    from distill_dist.losses import DenseTeacher, LossSpec, fused_linear_loss
    from distill_dist.models import load_causal_lm, load_tokenizer

    teacher_dir = SHARED / "models" / "TinyStories-656K"
    prune_checkpoint(teacher_dir, tmp_path / "pruned", 0.5, log=lambda *a: None)
    base = [f"model.path={teacher_dir}", f"train.student={tmp_path / 'pruned'}",
            f"data.path={SHARED / 'commonsense_qa'}", "data.train_examples=80", "data.max_length=128",
            "train.arm=kl", "train.positions=all", "train.max_steps=20", "train.micro_batch_size=4", "train.lr=2e-3",
            "train.warmup_steps=2", "train.eval_after=false", "train.save_every=0",
            f"train.output_dir={tmp_path / 'kl'}"]
    assert cli.main(["train"] + base) == 0
    tok = load_tokenizer(str(teacher_dir))
    cfg = load_config(None, base)
    held_out = build_train_examples(tok, load_split(cfg.data, "validation").select(range(32)), "kl", "all", 128)
    teacher = load_causal_lm(str(teacher_dir))

    @torch.no_grad()
    def heldout_kl(student):
        total = 0.0
        for r in held_out:
            ids = torch.tensor([r["input_ids"]])
            hs = student.model(input_ids=ids).last_hidden_state[0]
            ht = teacher.model(input_ids=ids).last_hidden_state[0]
            total += fused_linear_loss(hs, student.lm_head.weight, LossSpec("kl"),
                                       teacher=DenseTeacher(ht, teacher.lm_head.weight)).item()
        return total / len(held_out)

    before = heldout_kl(load_causal_lm(str(tmp_path / "pruned")))
    after = heldout_kl(load_causal_lm(str(tmp_path / "kl" / "final")))
    assert before > 0.01
    assert after < 0.9 * before, (before, after)


def test_iterative_schedule_prunes_between_stages(setup, tmp_path):
    root = setup["root"]
    sched = ["prune.mode=iterative", "prune.schedule=[0.5,0.25]", f"prune.output_dir={tmp_path / 'pruned'}"]
    assert cli.main(["prune", f"model.path={root / 'teacher'}", *sched]) == 0
    base = [a for a in setup["base"] if not a.startswith("train.student=")]
    run = tmp_path / "kl"
    assert cli.main(["train", *base, *sched, "train.arm=kl", "train.max_steps=3",
                     f"train.output_dir={run}"]) == 0
    plan0 = json.loads((tmp_path / "pruned" / "pruning_plan.json").read_text())
    done = json.loads((run / "done.json").read_text())
    assert done["plan_sha256"] == plan0["plan_sha256"] and done["keep_ratio"] == 0.25
    assert json.loads((run / "stage0" / "final" / "config.json").read_text())["intermediate_size"] == 64
    final = AutoModelForCausalLM.from_pretrained(run / "stage1" / "final")
    assert final.config.intermediate_size == 32  # ceil(0.25 * 128): counted against the original size
    stage1_plan = json.loads((run / "stage1" / "student" / "pruning_plan.json").read_text())
    assert stage1_plan["root_fingerprint"] == plan0["source_fingerprint"]
    assert len(metrics(run / "stage0")) == len(metrics(run / "stage1")) == 3
    assert (run / "eval" / "eval.json").is_file()


def test_gradient_checkpointing_gives_the_same_curve(setup, tmp_path):
    """train.gradient_checkpointing recomputes activations in backward: same losses, same weights."""
    args = setup["base"] + ["train.arm=ce", "train.max_steps=3", "train.eval_after=false"]
    for name, flag in (("plain", "false"), ("ckpt", "true")):
        assert cli.main(["train"] + args + [f"train.gradient_checkpointing={flag}",
                                            f"train.output_dir={tmp_path / name}"]) == 0
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "ckpt")
    assert len(a) == 3 and a[0]["loss"] > 0
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
    wa, wb = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("plain", "ckpt"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arm,accum", [("ce", 2), ("kl", 1)])
def test_one_rank_plain_engine_steps_like_zero3(setup, tmp_path, arm, accum):
    """One rank runs the plain (ZeRO stage 0) engine by default, train.single_rank_zero3 the ZeRO-3 one: the
    same step-1 loss and a 4-step curve (loss, grad norm) and weights within float32 reduction-order noise."""
    args = setup["base"] + [f"train.arm={arm}", "train.max_steps=4", f"train.grad_accum={accum}",
                            "train.eval_after=false", "train.save_every=2"]
    for name, zero3 in (("plain", "false"), ("zero3", "true")):
        assert cli.main(["train"] + args + [f"train.single_rank_zero3={zero3}",
                                            f"train.output_dir={tmp_path / name}"]) == 0
    stages = {n: json.loads((tmp_path / n / "sharding" / "rank0.json").read_text())["student_zero_stage"]
              for n in ("plain", "zero3")}
    assert stages == {"plain": 0, "zero3": 3}
    if arm == "kl":  # one rank, teacher.placement=auto: the whole teacher on the rank, nothing to gather
        assert json.loads((tmp_path / "plain" / "run_meta.json").read_text())["teacher"]["placement"] == "replicated"
    a, b = metrics(tmp_path / "plain"), metrics(tmp_path / "zero3")
    assert len(a) == len(b) == 4 and a[0]["loss"] > 0
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=1e-6)  # no update yet: the same forward
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=2e-6)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert len({round(m["loss"], 6) for m in a}) > 1  # the steps really moved the weights
    wa, wb = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("plain", "zero3"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_one_rank_plain_engine_resumes_exactly(setup, tmp_path, monkeypatch):
    """The plain engine's checkpoint (model, AdamW state, schedule, RNG) resumes to the uninterrupted curve."""
    from distill_dist import signals

    args = ["train"] + setup["base"] + ["train.arm=ce", "train.max_steps=4", "train.eval_after=false"]
    assert cli.main(args + [f"train.output_dir={tmp_path / 'full'}"]) == 0
    calls = []
    monkeypatch.setattr(signals, "stop_requested", lambda: calls.append(1) or len(calls) == 2)  # after step 2
    assert cli.main(args + [f"train.output_dir={tmp_path / 'resumed'}"]) == signals.EXIT_PREEMPTED
    monkeypatch.setattr(signals, "stop_requested", lambda: False)
    assert cli.main(args + [f"train.output_dir={tmp_path / 'resumed'}"]) == 0
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4]
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in full]
