"""Teacher-logit cache: round trip, sharded/resumed == one-shot, refusals, fidelity, 2-rank caching."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill_dist import cli
from distill_dist.cache import CacheError, TeacherCache, pack_ids, unpack_ids
from distill_dist.distributed import free_port
from distill_dist.config import TinyModelConfig, load_config
from distill_dist.data import build_train_examples, load_split
from distill_dist.losses import LossSpec, chunked_loss
from distill_dist.models import build_tiny_model, load_causal_lm, load_tokenizer
from distill_dist.prune import prune_checkpoint

REPO = Path(__file__).resolve().parents[1]

from conftest import make_teacher_and_student  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data, tok = make_teacher_and_student(root, n_train=120, n_dev=20, data_seed=4, model_seed=2, teacher_steps=100)
    base = [f"model.path={root / 'teacher'}", f"data.path={data}", "data.max_length=64", "train.positions=all",
            "teacher.shard_samples=32", "teacher.batch_size=8", f"output_dir={root}"]
    return {"root": root, "data": data, "base": base, "vocab": len(tok)}


def cache(env, name, *extra):
    out = env["root"] / name
    assert cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={out}", *extra]) == 0
    return out


def test_pack_ids_round_trip():
    ids = torch.tensor([[0, 1, 255, 256], [65535, 65536, 100351, (1 << 24) - 1]])
    packed = pack_ids(ids)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 4, 3)
    assert torch.equal(unpack_ids(packed), ids)


def test_round_trip_matches_the_teacher(env):
    out = cache(env, "exact", "teacher.dtype=float32", "teacher.top_k=8")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == 120 and manifest["num_shards"] == 4
    c = TeacherCache.open(out)
    cfg = load_config(None, env["base"])
    tok = load_tokenizer(str(env["root"] / "teacher"))
    rows = build_train_examples(tok, load_split(cfg.data, "train"), "kl", "all", 64)
    teacher = load_causal_lm(str(env["root"] / "teacher"))
    for r in (rows[0], rows[77]):
        with torch.no_grad():
            logp = torch.log_softmax(teacher(torch.tensor([r["input_ids"]])).logits[0].double(), -1)
        lp, ids, tail = c.lookup([r], "cpu")
        ref_v, ref_i = logp.topk(8, -1)
        assert torch.equal(ids, ref_i)
        torch.testing.assert_close(lp.double(), ref_v, atol=1e-5, rtol=0)
        ref_tail = torch.logsumexp(logp.scatter(1, ref_i, float("-inf")), -1)
        torch.testing.assert_close(tail.double(), ref_tail, atol=1e-5, rtol=0)
        assert (tail < 0).all()  # a proper distribution: top-k mass + tail mass = 1
        torch.testing.assert_close((lp.double().exp().sum(-1) + tail.double().exp()), torch.ones(len(tail),
                                   dtype=torch.float64), atol=1e-5, rtol=0)


def test_sharded_and_resumed_equals_one_shot_byte_for_byte(env):
    one = cache(env, "one_shot")
    parts = env["root"] / "parts"
    for i in (2, 0):  # array tasks, out of order
        assert cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={parts}", "--shard", str(i),
                         "--num-shards", "4"]) == 0
    assert not (parts / "manifest.json").exists()  # not all shards yet
    victim = parts / "shard-00002-of-00004.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])  # a shard cut off mid-write is redone
    assert cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={parts}", "--num-shards", "4"]) == 0
    names = sorted(p.name for p in one.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in parts.glob("shard-*.safetensors")) and len(names) == 4
    for n in names:
        assert (one / n).read_bytes() == (parts / n).read_bytes()
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, parts))
    assert a["fingerprint_sha256"] == b["fingerprint_sha256"] and a["shards"] == b["shards"]


def test_bytes_per_position_at_k64_fp16(env):
    m = json.loads((cache(env, "k64", "teacher.top_k=64").joinpath("manifest.json")).read_text())
    # 64 fp16 values + 64 3-byte ids + fp32 tail = 324 B, plus per-sample offsets/ids and headers
    assert 324 <= m["bytes_per_position"] < 400


def test_corrupt_foreign_and_incomplete_caches_are_refused(env, tmp_path, capsys):
    src = env["root"] / "one_shot"
    if not (src / "manifest.json").exists():
        src = cache(env, "one_shot")
    bad = tmp_path / "corrupt"
    shutil.copytree(src, bad)
    shard = bad / "shard-00001-of-00004.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00001-of-00004.safetensors: checksum mismatch"):
        TeacherCache.open(bad)
    train = ["train", *env["base"], f"train.student={env['root'] / 'pruned'}", "train.deepspeed=false",
             "teacher.source=cache", "train.max_steps=2", "train.eval_after=false"]
    assert cli.main(train + [f"teacher.cache_dir={bad}", f"train.output_dir={tmp_path / 'r0'}"]) == 2
    assert "checksum mismatch" in capsys.readouterr().err
    assert cli.main(train + [f"teacher.cache_dir={src}", "train.temperature=2.0", f"train.output_dir={tmp_path / 'r1'}"]) == 2
    assert "temperature: cache 1.0 vs run 2.0" in capsys.readouterr().err
    assert cli.main(train + [f"teacher.cache_dir={src}", "train.positions=answer", f"train.output_dir={tmp_path / 'r2'}"]) == 2
    assert "positions: cache all vs run answer" in capsys.readouterr().err
    # a student pruned from another teacher: the cache's teacher fingerprint differs
    tok = load_tokenizer(str(env["root"] / "teacher"))
    other = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=128, num_heads=2, num_kv_heads=2, seed=9), tok)
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    prune_checkpoint(tmp_path / "other", tmp_path / "other_pruned", 0.25, log=lambda *a: None)
    assert cli.main(train + [f"teacher.cache_dir={src}", f"train.student={tmp_path / 'other_pruned'}",
                             f"train.output_dir={tmp_path / 'r3'}"]) == 2
    assert "does not match this run: teacher:" in capsys.readouterr().err
    c = TeacherCache.open(src)
    with pytest.raises(CacheError, match="lacks 1 training samples"):
        c.check(c.manifest["fingerprint"], ["syn-4-0", "not-a-sample"])
    incomplete = tmp_path / "incomplete"
    shutil.copytree(src, incomplete)
    (incomplete / "manifest.json").unlink()
    with pytest.raises(CacheError, match="no manifest.json"):
        TeacherCache.open(incomplete)


def test_kl_from_full_vocab_cache_equals_live_kl(env):
    out = cache(env, "full", "teacher.dtype=float32", f"teacher.top_k={env['vocab'] + 64}")
    c = TeacherCache.open(out)
    cfg = load_config(None, env["base"])
    tok = load_tokenizer(str(env["root"] / "teacher"))
    rows = build_train_examples(tok, load_split(cfg.data, "train"), "kl", "all", 64)[:6]
    from distill_dist.data import collate
    from distill_dist.train import TeacherHidden

    teacher = TeacherHidden(load_causal_lm(str(env["root"] / "teacher")))
    student = load_causal_lm(str(env["root"] / "pruned"))
    batch = collate(rows, tok.pad_token_id, "cpu")
    with torch.no_grad():
        hs = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[
            batch["rows"], batch["cols"]]
        live = chunked_loss(hs, student.lm_head, LossSpec("kl"), None, teacher(**batch), teacher.lm.lm_head)
        cached = chunked_loss(hs, student.lm_head, LossSpec("kl"), None, teacher_cache=c.lookup(rows, "cpu"))
    assert live.item() > 1e-3
    assert abs(cached.item() - live.item()) / live.item() < 1e-6


def test_training_from_cache_matches_live_teacher(env, tmp_path):
    out = env["root"] / "full"
    if not (out / "manifest.json").exists():
        out = cache(env, "full", "teacher.dtype=float32", f"teacher.top_k={env['vocab'] + 64}")
    common = ["train", *env["base"], f"train.student={env['root'] / 'pruned'}", "train.deepspeed=false",
              "train.max_steps=4", "train.micro_batch_size=4", "train.lr=1e-4", "train.eval_after=false",
              "teacher.dtype=float32", f"teacher.top_k={env['vocab'] + 64}"]
    assert cli.main(common + ["teacher.source=live", f"train.output_dir={tmp_path / 'live'}"]) == 0
    assert cli.main(common + ["teacher.source=cache", f"teacher.cache_dir={out}", f"train.output_dir={tmp_path / 'cache'}"]) == 0
    live, cached = ([json.loads(l)["loss"] for l in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                    for d in ("live", "cache"))
    assert len(live) == 4
    for a, b in zip(live, cached):
        assert b == pytest.approx(a, rel=1e-5)
    meta = json.loads((tmp_path / "cache" / "run_meta.json").read_text())
    assert meta["teacher"]["source"] == "cache"
    assert meta["teacher"]["fingerprint"] == json.loads((out / "manifest.json").read_text())["fingerprint_sha256"]


@pytest.mark.multirank
def test_two_rank_zero3_caching_equals_single_process(env):
    single = env["root"] / "exact"
    if not (single / "manifest.json").exists():
        single = cache(env, "exact", "teacher.dtype=float32", "teacher.top_k=8")
    multi = env["root"] / "zero3"
    port = free_port()
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port), "-m", "distill_dist.cli", "cache-teacher", *env["base"],
         f"teacher.cache_dir={multi}", "teacher.dtype=float32", "teacher.top_k=8",
         f"train.teacher_ds_config={REPO / 'ds_configs/teacher_zero3_inference.json'}",
         "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (single, multi))
    assert a["fingerprint_sha256"] == b["fingerprint_sha256"]
    for s in a["shards"]:
        ta, tb = load_file(single / s["file"]), load_file(multi / s["file"])
        assert torch.equal(ta["ids"], tb["ids"]) and torch.equal(ta["offsets"], tb["offsets"])
        torch.testing.assert_close(ta["logprobs"], tb["logprobs"], atol=1e-5, rtol=0)
        torch.testing.assert_close(ta["log_tail"], tb["log_tail"], atol=1e-5, rtol=0)
