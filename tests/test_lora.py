"""train.adapter=lora: peft adapters on the pruned student, trained by the same recipe as a full run and merged
into a standard checkpoint. Against peft itself: the merged final/ equals `merge_and_unload()` of the pruned
student with the run's saved adapters tensor for tensor (so every base weight is bit-identical to the
student's until the merge), and its float32 logits equal the unmerged PeftModel's within 1e-5. Real DeepSpeed
ZeRO-3: 2 gloo ranks equal 1 process per step, and a run stopped by a signal and resumed equals the
uninterrupted one bit for bit. Bad settings are one line and exit 2 on every rank."""
import json
from pathlib import Path

import pytest
import torch
from conftest import as_ranks, assert_same_refusal, randomize_
from safetensors.torch import load_file
from test_train import REPO, metrics, torchrun, usr1_after_steps
from transformers import AutoModelForCausalLM

from distill_dist import cli

STEPS = 12
LORA = ["train.adapter=lora", "train.lora_rank=4", "train.lora_alpha=8", "train.lr=3e-3", "train.warmup_steps=1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny OLMo2 teacher whose every weight matters (conftest.randomize_: untrained, its MLP far from
    negligible, so the pruned student's KL to it is ~0.1 nats, not the ~1e-5 of a briefly trained one) and its
    pruned student."""
    from distill_dist.config import TinyModelConfig
    from distill_dist.models import build_tiny_model
    from distill_dist.prune import prune_checkpoint
    from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa

    root = tmp_path_factory.mktemp("lora")
    data = write_synthetic_csqa(root / "data", n_train=96, n_dev=24, n_test=4, seed=5)
    tok = train_tokenizer(data)
    teacher = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=128, num_heads=2, num_kv_heads=2,
                                               seed=2), tok)
    randomize_(teacher, 2, std=0.3)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    prune_checkpoint(root / "teacher", root / "pruned", 0.25, log=lambda *a: None)
    base = [f"model.path={root / 'teacher'}", f"train.student={root / 'pruned'}", f"data.path={data}",
            "data.max_length=64", "train.micro_batch_size=2", "train.save_every=0", "eval.limit=16",
            "eval.batch_size=16", f"output_dir={root}",
            "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}",
            f"train.ds_config={REPO / 'ds_configs/student_zero3.json'}",
            f"train.teacher_ds_config={REPO / 'ds_configs/teacher_zero3_inference.json'}", *LORA]
    return {"root": root, "data": data, "base": base}


def peft_student(student: Path, adapter: Path):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).eval()


@pytest.mark.parametrize("arm,fmt", [("ce", "mc"), ("kl", "cloze")])
def test_merged_final_equals_peft_merge_and_only_adapters_train(setup, arm, fmt):
    run = setup["root"] / f"one_{arm}_{fmt}"
    assert cli.main(["train", *setup["base"], f"train.arm={arm}", f"data.format={fmt}", "train.max_steps=6",
                     f"train.output_dir={run}"]) == 0
    pruned, final = load_file(setup["root"] / "pruned" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    assert final.keys() == pruned.keys()  # the standard names and the pruned shapes, no adapter tensors
    assert all(final[k].shape == pruned[k].shape for k in final)
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapter.items())  # the adapters trained
    meta = json.loads((run / "run_meta.json").read_text())["adapter"]
    assert meta["trainable_params"] == sum(v.numel() for v in adapter.values())
    assert meta["trainable_share"] == pytest.approx(meta["trainable_params"] / sum(v.numel() for v in pruned.values()))
    targeted = [k for k in final if any(f".{t}." in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                 "up_proj", "down_proj"))]
    assert targeted and all(not torch.equal(final[k], pruned[k]) for k in targeted)
    for k in final.keys() - set(targeted):  # embeddings, norms, LM head: never trained
        assert torch.equal(final[k], pruned[k]), k
    # peft's own merge of the untouched student and the saved adapters: the same tensors bit for bit, which
    # also shows each base weight stayed the student's until the merge
    model = peft_student(setup["root"] / "pruned", run / "adapter")
    ids = torch.randint(0, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        peft_logits = model(input_ids=ids).logits
        merged = model.merge_and_unload().state_dict()
        final_logits = AutoModelForCausalLM.from_pretrained(run / "final").eval()(input_ids=ids).logits
    for k in final:
        assert torch.equal(final[k], merged[k]), k
    assert peft_logits.abs().max() > 1
    torch.testing.assert_close(final_logits, peft_logits, rtol=0, atol=1e-5)
    done = json.loads((run / "done.json").read_text())
    assert done["eval"]["n"] == 16 and done["adapter"]["kind"] == "lora"


@pytest.fixture(scope="module")
def zero3_lora(setup):
    """The uninterrupted 2-rank ZeRO-3 KL LoRA run (live teacher) the equivalence and resume tests compare with."""
    run = setup["root"] / "zero3_lora"
    torchrun(setup["base"] + ["train.arm=kl", f"train.max_steps={STEPS}", f"train.output_dir={run}"])
    return run


@pytest.mark.multirank
def test_zero3_two_ranks_equal_one_process(setup, zero3_lora):
    one = setup["root"] / "one_rank_lora"
    assert cli.main(["train", *setup["base"], "train.arm=kl", f"train.max_steps={STEPS}", "train.grad_accum=2",
                     f"train.output_dir={one}"]) == 0
    a, b = metrics(zero3_lora), metrics(one)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):  # the full-parameter equivalence test's tolerance (test_train.py)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=2e-6)
    assert sum(m["loss"] for m in a[-3:]) < sum(m["loss"] for m in a[:3])  # it learns
    wa, wb = (load_file(r / "final" / "model.safetensors") for r in (zero3_lora, one))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)
    shards = [json.loads((zero3_lora / "sharding" / f"rank{r}.json").read_text())["student"] for r in (0, 1)]
    adapters = {n: v for n, v in shards[0].items() if ".lora_" in n}
    assert adapters and all(local == -(-full // 2) for local, full in adapters.values())  # partitioned too


@pytest.mark.multirank
def test_signal_then_resume_equals_uninterrupted(setup, zero3_lora):
    run = setup["root"] / "resumed_lora"
    args = setup["base"] + ["train.arm=kl", f"train.max_steps={STEPS}", f"train.output_dir={run}"]
    proc = torchrun(args, wait=False)
    workers = usr1_after_steps(proc, run, 3)
    out, _ = proc.communicate(timeout=300)
    assert workers and "exiting with 75" in out, out[-3000:]
    assert 3 <= len(metrics(run)) < STEPS
    ckpt = next((run / "checkpoints").glob("step_*"))
    assert sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) < 2e6  # adapters + their optimizer state
    torchrun(args)
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(zero3_lora)]  # bit for bit
    assert [m["grad_norm"] for m in metrics(run)] == [m["grad_norm"] for m in metrics(zero3_lora)]
    a, b = (load_file(r / "adapter" / "adapter_model.safetensors") for r in (run, zero3_lora))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("setting,expected", [
    ("train.lora_rank=0", "config field 'train.lora_rank' = 0: expected an integer >= 1"),
    ("train.lora_targets=[]", "config field 'train.lora_targets' = []: expected a non-empty list"),
    ("train.lora_dropout=1.0", "config field 'train.lora_dropout' = 1.0: expected a number in [0, 1)"),
    ("train.adapter=qlora", "config field 'train.adapter' = 'qlora': expected full or lora")])
def test_bad_settings_are_one_line_exit_2(setting, expected, capsys):
    assert cli.main(["train", "train.adapter=lora", setting]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("distill-dist")]
    assert len(err) == 1 and expected in err[0], err


@pytest.mark.multirank
def test_a_target_matching_no_module_is_refused_on_every_rank(refusal_env, tmp_path):
    codes, errs, seconds = as_ranks(refusal_env["base"] + ["train.adapter=lora", "train.lora_targets=[q_proj,qkv]",
                                                           f"train.output_dir={tmp_path / 'r'}"])
    assert_same_refusal(codes, errs, seconds, "config field 'train.lora_targets': 'qkv' matches no linear module")


@pytest.mark.parametrize("arm", ["ce", "kl"])
def test_tinystories_lora_final_exports_to_gguf_and_scores_in_llamacpp(arm, tinystories_dir, csqa_dir, tmp_path):
    """A real pretrained Llama (TinyStories-656K, tied embeddings) pruned to half its MLP, recovered with
    adapters; its merged final/ goes through `distill-dist export` and `distill-dist eval eval.backend=llamacpp`
    unchanged, and llama.cpp's per-choice log-likelihoods of the f32 file equal transformers' on final/."""
    import numpy as np

    pytest.importorskip("llama_cpp", reason="the llama.cpp runtime is not installed (bash setup.sh installs it)")
    from distill_dist import export as export_mod
    from distill_dist.errors import ConfigError
    from distill_dist.prune import prune_checkpoint

    try:
        export_mod.converter_dir()
    except ConfigError as e:
        pytest.skip(str(e))
    prune_checkpoint(tinystories_dir, tmp_path / "pruned", 0.5, log=lambda *a: None)
    common = [f"model.path={tinystories_dir}", f"data.path={csqa_dir}", "data.train_examples=48", "data.max_length=128",
              "eval.limit=24", "eval.threads=[1]", f"output_dir={tmp_path}"]
    run = tmp_path / arm
    assert cli.main(["train", *common, f"train.student={tmp_path / 'pruned'}", f"train.arm={arm}", "train.max_steps=4",
                     "train.micro_batch_size=4", "train.save_every=0", f"train.output_dir={run}", *LORA]) == 0
    assert cli.main(["export", *common, f"export.model={run / 'final'}", "export.types=[f32,q8_0]", "export.threads=1"]) == 0
    gguf = tmp_path / "gguf" / arm
    scores = {}
    for t in ("f32", "q8_0"):
        out = tmp_path / f"eval_{t}"
        assert cli.main(["eval", *common, "eval.backend=llamacpp", f"eval.model={gguf / export_mod.gguf_name(t)}",
                         f"eval.output_dir={out}"]) == 0
        scores[t] = np.array([json.loads(l)["logliks"] for l in (out / "examples.jsonl").read_text().splitlines()])
        assert json.loads((out / "eval.json").read_text())["metrics"]["n"] == 24
    torch_rows = [json.loads(l)["logliks"] for l in (run / "eval" / "examples.jsonl").read_text().splitlines()]
    assert np.abs(scores["f32"] - np.array(torch_rows)).max() < 1e-3  # test_edge.py's PARITY_TOL
    assert np.isfinite(scores["q8_0"]).all()


def test_report_keeps_lora_arms_apart_from_full_arms(tmp_path):
    """Full and LoRA runs of one pruning, schedule and questions: two groups, the LoRA one headed by its rank and
    trainable share, its arms named 'CE·LoRA r16' / 'KL·LoRA r16'; no comparison pairs a LoRA arm with a full one.
    LoRA runs whose settings differ are refused in one group."""
    from test_report import _edit, _run

    from distill_dist.report import ReportError, make_report

    adapter = {"kind": "lora", "rank": 16, "alpha": 32.0, "dropout": 0.0, "targets": ["q_proj"],
               "trainable_params": 12, "trainable_share": 0.012}
    runs = [_run(tmp_path, f"{arm}_{kind}_{seed}", arm, seed=seed, acc=0.4 + 0.1 * (kind == "lora"))
            for arm in ("ce", "kl") for kind in ("full", "lora") for seed in (0, 1)]
    for r in runs:
        if "_lora_" in r.name:
            _edit(r, "adapter", adapter)
    md, rows = make_report([str(r) for r in runs], tmp_path / "report")
    sections = md.split("\n## ")[1:]
    assert len(sections) == 2
    full, lora_group = sections
    assert "LoRA" not in full.split("\n")[0] and "| CE | 0, 1 |" in full and "KL − CE" in full
    assert "LoRA r16 (alpha 32, 1.20% of parameters trained)" in lora_group.split("\n")[0]
    assert "| CE·LoRA r16 | 0, 1 |" in lora_group and "KL·LoRA r16 − CE·LoRA r16" in lora_group
    names = {r["name"] for r in rows if r["row_type"] == "comparison"}
    assert all(("LoRA" in n.split(" − ")[0]) == ("LoRA" in n.split(" − ")[-1]) for n in names if "−" in n
               and all(k in n for k in ("CE", "KL"))), names
    assert "| 0.5 | 1000 | LoRA r16 | 0, 1 |" in md  # the overview names the adapter of each group
    _edit(runs[3], "adapter", adapter | {"alpha": 16.0})
    with pytest.raises(ReportError, match=r"their adapter.alpha differ \(32.0 vs 16.0\)"):
        make_report([str(r) for r in runs], tmp_path / "report2")


@pytest.mark.parametrize("targets", [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                     ["self_attn.v_proj", "down_proj"]])
def test_plan_prices_the_adapters_peft_creates(tiny_olmo2_dir, targets):
    """plan.py's adapter count from the config alone equals the parameters peft actually makes trainable on the
    real model; the one-GPU rows price the frozen base at its weights only."""
    from peft import LoraConfig, get_peft_model

    from distill_dist.config import load_config
    from distill_dist.plan import ModelShape, costed_plan, lora_params, model_states

    model = AutoModelForCausalLM.from_pretrained(tiny_olmo2_dir)
    shape = ModelShape.from_config(model.config)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    assert lora_params(shape, 8, targets) == sum(p.numel() for p in peft_model.parameters() if p.requires_grad) > 0
    cfg = load_config(None, ["prune.schedule=[1.0]", "model.dtype=bfloat16", "train.lora_rank=8", f"train.lora_targets=[{','.join(targets)}]"])
    og = costed_plan(cfg, json.loads((tiny_olmo2_dir / "config.json").read_text()))["one_gpu"]
    n, a = og["full"]["trainable_params"], og["lora"]["trainable_params"]
    assert a == lora_params(shape, 8, targets) and n == shape.params()
    steady = {k: model_states(k_n, 1, 2)["peak"] for k, k_n in (("full", n), ("adapters", a))}
    assert og["lora"]["model_states"] == pytest.approx(2 * n + steady["adapters"])  # base: 2 bytes/param, bf16
    assert og["full"]["model_states"] == pytest.approx(steady["full"])


def test_demo_lora_option_adds_one_lora_run_per_arm_to_the_headline_group(tmp_path):
    from distill_dist.config import load_config
    from distill_dist.demo import arm_command, plan_runs

    plain = plan_runs(load_config(None, ["demo.seeds=2"]), tmp_path)[0]
    headline, curves = plan_runs(load_config(None, ["demo.seeds=2", "demo.lora=true", "demo.lora_lr=2e-3"]), tmp_path)
    assert headline[:len(plain)] == plain and all(r.lora_lr is None for r in plain + curves)
    extra = headline[len(plain):]
    assert [(r.arm, r.seed, r.lora_lr, r.ranks) for r in extra] == [("ce", 0, 2e-3, 2), ("kl", 0, 2e-3, 2)]
    assert [r.output_dir.parent for r in extra] == [plain[0].output_dir.parent] * 2  # the headline group's cell
    cmd = arm_command(tmp_path / "demo_config.yaml", extra[1])
    overrides = cmd[cmd.index("--config") + 2:]
    cfg = load_config(None, overrides)
    assert (cfg.train.adapter, cfg.train.lr, cfg.train.arm, cfg.train.output_dir) == \
        ("lora", 2e-3, "kl", str(tmp_path / "keep0.5" / "n8000" / "kl_lora_s0"))
    assert "train.adapter=lora" not in arm_command(tmp_path / "demo_config.yaml", plain[1])


def test_kl_lora_from_a_full_vocab_cache_equals_the_live_teacher(setup, tmp_path):
    """teacher.source=cache with every log-prob stored (top_k = vocab, float32) is the live teacher exactly:
    a LoRA run from it follows the live LoRA run's losses, as test_cache.py shows for full runs."""
    from distill_dist.hf_checkpoint import read_model_config

    vocab = read_model_config(setup["root"] / "teacher")["vocab_size"]
    exact = ["teacher.dtype=float32", f"teacher.top_k={vocab}", f"teacher.cache_dir={tmp_path / 'cache'}"]
    assert cli.main(["cache-teacher", *setup["base"], *exact, "train.positions=all"]) == 0
    args = ["train", *setup["base"], *exact, "train.arm=kl", "train.positions=all", "train.max_steps=4",
            "train.eval_after=false"]
    assert cli.main(args + ["teacher.source=live", f"train.output_dir={tmp_path / 'live'}"]) == 0
    assert cli.main(args + ["teacher.source=cache", f"train.output_dir={tmp_path / 'cached'}"]) == 0
    live, cached = ([m["loss"] for m in metrics(tmp_path / r)] for r in ("live", "cached"))
    assert len(live) == 4 and live[-1] < live[0]
    assert live[0] > 1e-3 and cached == pytest.approx(live, rel=1e-4, abs=2e-6)  # the equivalence tests' tolerance
    assert json.loads((tmp_path / "cached" / "run_meta.json").read_text())["adapter"]["kind"] == "lora"


def test_frozen_base_train_flops_match_torch_flop_counter():
    """With every base weight frozen (LoRA's base; the adapters' own matmuls, ~rank/hidden of a layer's, left
    out here) backward computes input gradients only: plan.train_flops(frozen=True) = forward + (forward +
    attention again), by torch's own FLOP counter on a real OLMo2 (eager attention, LM head at every position)."""
    from test_plan import SMALL
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Olmo2Config, Olmo2ForCausalLM

    from distill_dist.plan import ModelShape, train_flops

    torch.manual_seed(0)
    model = Olmo2ForCausalLM._from_config(Olmo2Config(**SMALL), attn_implementation="eager").requires_grad_(False)
    shape = ModelShape.from_config(model.config)
    B, L = 2, 40
    embeds = model.get_input_embeddings()(torch.randint(0, 512, (B, L))).requires_grad_(True)  # what grads flow to
    with FlopCounterMode(display=False) as both:
        model(inputs_embeds=embeds).logits.float().pow(2).mean().backward()
    assert embeds.grad.abs().max() > 0
    assert both.get_total_flops() == pytest.approx(B * train_flops(shape, L, L, frozen=True), rel=0.01)
    assert train_flops(shape, L, L, frozen=True) < 0.7 * train_flops(shape, L, L)
