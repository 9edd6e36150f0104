"""train.freeze_embeddings: full recovery with the input embedding matrix (and a tied LM head, which is the same
tensor) left as the pruned student's. Real DeepSpeed: the plain 1-rank engine trains everything else, exports a
standard checkpoint whose embedding is the student's bit for bit, and resumes to the uninterrupted curve; on a
tied real Llama 2 ZeRO-3 gloo ranks equal 1 process. The setting is recorded, so resume and the report refuse
to mix frozen and trained embeddings, each in one line."""
import json

import pytest
import torch
from safetensors.torch import load_file
from test_train import SHARED, metrics, torchrun
from transformers import AutoModelForCausalLM

from distill_dist import cli, signals

FREEZE = "train.freeze_embeddings=true"
EMBED = "model.embed_tokens.weight"


def test_frozen_embedding_stays_the_students_and_resumes_exactly(refusal_env, tmp_path, monkeypatch, capsys):
    """OLMo 2 (untied): the embedding is bit-identical to the pruned student's after training and resume, and
    left out of checkpoints; the untied LM head and the layers train; a checkpoint of a frozen run is refused
    by a run that would train the embedding."""
    args = ["train", *refusal_env["base"], "train.arm=ce", "train.max_steps=4", "train.save_every=0", FREEZE]
    assert cli.main(args + [f"train.output_dir={tmp_path / 'full'}"]) == 0
    calls = []
    monkeypatch.setattr(signals, "stop_requested", lambda: calls.append(1) or len(calls) == 2)  # after step 2
    assert cli.main(args + [f"train.output_dir={tmp_path / 'resumed'}"]) == signals.EXIT_PREEMPTED
    monkeypatch.setattr(signals, "stop_requested", lambda: False)
    saved = torch.load(next((tmp_path / "resumed" / "checkpoints").rglob("mp_rank_00_model_states.pt")),
                       weights_only=False)["module"]
    assert f"lm.{EMBED}" not in saved and "lm.lm_head.weight" in saved  # frozen: not written, the head is
    capsys.readouterr()
    assert cli.main([*args[:-1], f"train.output_dir={tmp_path / 'resumed'}"]) == 2  # would train the embedding
    assert "holds a checkpoint of a different run (adapter: " in capsys.readouterr().err
    assert cli.main(args + [f"train.output_dir={tmp_path / 'resumed'}"]) == 0
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "resumed")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full] and len({m["loss"] for m in full}) > 1
    assert [m["grad_norm"] for m in resumed] == [m["grad_norm"] for m in full]
    pruned = load_file(refusal_env["root"] / "pruned" / "model.safetensors")
    for run in ("full", "resumed"):
        final = load_file(tmp_path / run / "final" / "model.safetensors")
        assert final.keys() == pruned.keys()
        assert torch.equal(final[EMBED], pruned[EMBED]) and pruned[EMBED].abs().max() > 0
        changed = {k for k in final if not torch.equal(final[k], pruned[k])}
        assert "lm_head.weight" in changed and any(".mlp." in k for k in changed) and any(".self_attn." in k for k in changed)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full" / "final")  # a standard checkpoint
    assert torch.equal(model.get_input_embeddings().weight, pruned[EMBED])
    adapter = json.loads((tmp_path / "full" / "run_meta.json").read_text())["adapter"]
    total = sum(v.numel() for v in pruned.values())
    assert adapter == {"kind": "full", "freeze_embeddings": True, "trainable_params": total - pruned[EMBED].numel(),
                       "trainable_share": pytest.approx((total - pruned[EMBED].numel()) / total)}


@pytest.mark.multirank
@pytest.mark.skipif(not (SHARED / "models" / "TinyStories-656K").is_dir(), reason="../shared/data absent")
def test_tied_head_stays_frozen_and_two_zero3_ranks_equal_one_process(tmp_path):
    """A real Llama with tied embeddings (TinyStories-656K, the layout of Gemma 3): the embedding is its LM head,
    so neither trains; 2 ZeRO-3 gloo ranks (every parameter partitioned) equal 1 rank with grad_accum 2."""
    from distill_dist.prune import prune_checkpoint

    prune_checkpoint(SHARED / "models" / "TinyStories-656K", tmp_path / "pruned", 0.5, log=lambda *a: None)
    base = [f"model.path={SHARED / 'models' / 'TinyStories-656K'}", f"train.student={tmp_path / 'pruned'}",
            f"data.path={SHARED / 'commonsense_qa'}", "data.train_examples=32", "data.max_length=128",
            "train.arm=ce", "train.max_steps=4", "train.micro_batch_size=2", "train.lr=1e-3", "train.warmup_steps=0",
            "train.save_every=0", "train.eval_after=false", f"output_dir={tmp_path}", FREEZE,
            "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"]
    torchrun(base + [f"train.output_dir={tmp_path / 'two'}"])
    assert cli.main(["train", *base, "train.grad_accum=2", f"train.output_dir={tmp_path / 'one'}"]) == 0
    a, b = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert len(a) == len(b) == 4 and len({m["loss"] for m in a}) > 1
    for x, y in zip(a, b):  # test_train.py's 1 vs 2 rank tolerance
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=2e-6)
    pruned = load_file(tmp_path / "pruned" / "model.safetensors")
    tied = pruned.pop("lm_head.weight", None)  # the one tied tensor, stored under either name
    tied = pruned.pop(EMBED) if tied is None else tied
    finals = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("two", "one")]
    for final in finals:
        assert final.keys() == pruned.keys() | {EMBED}  # tied: no separate head tensor
        assert torch.equal(final[EMBED], tied) and tied.abs().max() > 0
        assert all(not torch.equal(final[k], pruned[k]) for k in pruned if ".mlp." in k)  # the rest trained
    for k in finals[0]:  # test_train.py's 1 vs 2 rank tolerance
        torch.testing.assert_close(finals[0][k], finals[1][k], rtol=1e-4, atol=1e-5)
    shard = json.loads((tmp_path / "two" / "sharding" / "rank0.json").read_text())["student"]
    assert shard[f"lm.{EMBED}"] == [-(-tied.numel() // 2), tied.numel()]  # partitioned like the rest


def test_refused_with_lora(capsys):
    assert cli.main(["train", "train.adapter=lora", FREEZE]) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("distill-dist")]
    assert len(err) == 1 and "config field 'train.freeze_embeddings' = True: expected false with train.adapter=lora" \
        in err[0], err


def test_report_names_frozen_groups_and_refuses_to_mix_them(tmp_path):
    """A group whose runs all froze the embedding is headed so; a frozen CE run beside a KL run that trained its
    embedding (recorded before the setting existed, or false) is refused in one line naming the field."""
    from test_report import _edit, _run

    from distill_dist.report import ReportError, make_report

    frozen = {"kind": "full", "freeze_embeddings": True, "trainable_params": 60, "trainable_share": 0.6}
    runs = [_run(tmp_path, f"{arm}_{seed}", arm, seed=seed) for arm in ("ce", "kl") for seed in (0, 1)]
    for r in runs:
        _edit(r, "adapter", frozen)
    md, _ = make_report([str(r) for r in runs], tmp_path / "report")
    assert " · embeddings frozen (60.00% of parameters trained) · " in md.split("\n## ")[1].split("\n")[0]
    assert "KL − CE" in md
    _edit(runs[2], "adapter", frozen | {"freeze_embeddings": False})
    with pytest.raises(ReportError, match=r"their adapter.freeze_embeddings differ \(true vs false\)"):
        make_report([str(r) for r in runs], tmp_path / "report2")
    rec = json.loads((runs[2] / "done.json").read_text())
    del rec["adapter"]
    (runs[2] / "done.json").write_text(json.dumps(rec))
    with pytest.raises(ReportError, match=r"their adapter.freeze_embeddings differ \(true vs false\)"):
        make_report([str(r) for r in runs], tmp_path / "report3")
