"""Teacher-logit cache (`distill-dist cache-teacher` writes it, teacher.py reads it): round trip against the
teacher in both formats, sharded/resumed == one-shot byte for byte, size, refusals, exactness at k >= V
(loss and training curve), 2-rank ZeRO-3 caching == single process.

Real code throughout: in-process `cli.main` (one process is the same ZeRO-3 path as N ranks) and a real
torchrun job. The teacher is a tiny OLMo2 with redrawn weights (std 0.3: entropy ~4.8 nats, top-32 mass
~0.6, so the hybrid's tail draws carry real weight) and its 25 %-kept pruned student."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import randomize_
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distill_dist import cli
from distill_dist.cache import CacheError, TeacherCache
from distill_dist.config import TinyModelConfig, load_config
from distill_dist.data import build_train_examples, collate, load_split
from distill_dist.fileio import sha256_file
from distill_dist.hf_checkpoint import read_header, read_model_config
from distill_dist.losses import DenseTeacher, LossSpec, fused_linear_loss
from distill_dist.models import build_tiny_model, load_causal_lm
from distill_dist.prune import prune_checkpoint
from distill_dist.runtime import free_port
from distill_dist.sparse_targets import unpack_entries
from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa
from distill_dist.teacher import CachedTeacher

REPO = Path(__file__).resolve().parents[1]
N_TRAIN, N_SHARDS = 40, 4
FORMATS = ("hybrid", "topk_bucket")


def _tiny(tok, seed: int, inter: int = 128):
    model = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=inter, num_heads=2, num_kv_heads=2,
                                             seed=seed), tok)
    randomize_(model, seed, std=0.3)
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    data = write_synthetic_csqa(root / "data", n_train=N_TRAIN, n_dev=4, n_test=4, seed=4)
    small = write_synthetic_csqa(root / "small", n_train=20, n_dev=4, n_test=4, seed=5)
    tok = train_tokenizer(data)
    _tiny(tok, 2).save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    prune_checkpoint(root / "teacher", root / "pruned", 0.25, log=lambda *a: None)
    base = [f"model.path={root / 'teacher'}", f"data.path={data}", "data.max_length=64", "train.positions=all",
            f"teacher.shard_samples={N_TRAIN // N_SHARDS}", "teacher.batch_size=8", f"output_dir={root}"]
    rows = build_train_examples(tok, load_split(load_config(None, base).data, "train"), "kl", "all", 64)
    return {"root": root, "data": data, "small": small, "base": base, "tok": tok, "rows": rows,
            "vocab": read_model_config(root / "teacher")["vocab_size"]}


def cache(env, name, *extra) -> Path:
    """cache-teacher into root/name (a complete cache is left alone: 'nothing to do')."""
    out = env["root"] / name
    assert cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={out}", *extra]) == 0
    return out


def stored(cache_dir: Path, rows: list[dict], split: list[dict]) -> dict[str, torch.Tensor]:
    """The rows' entries as the reader returns them (bound to the full training split `split`), ids unpacked."""
    c = TeacherCache.open(cache_dir)
    c.check(c.manifest["fingerprint"], [r["id"] for r in rows], [r["id"] for r in split])
    return unpack_entries(c.entries(rows))


def teacher_logp(env, rows: list[dict]) -> torch.Tensor:
    """float64 reference: the plain HF teacher's log-probs at the rows' supervised positions."""
    teacher = load_causal_lm(str(env["root"] / "teacher"))
    b = collate(rows, env["tok"].pad_token_id, "cpu")
    with torch.no_grad():
        logits = teacher(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[b["rows"], b["cols"]]
    return torch.log_softmax(logits.double(), -1)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("distill-dist: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------- what is stored

@pytest.mark.parametrize("fmt", FORMATS)
def test_round_trip_matches_the_teacher(env, fmt):
    k = 8
    out = cache(env, f"exact_{fmt}", f"teacher.format={fmt}", "teacher.dtype=float32", f"teacher.top_k={k}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == N_TRAIN and manifest["num_shards"] == N_SHARDS
    assert manifest["fingerprint"]["format"] == fmt and manifest["fingerprint"]["top_k"] == k
    rows = [env["rows"][0], env["rows"][N_TRAIN - 3]]  # first and last shard
    e, logp = stored(out, rows, env["rows"]), teacher_logp(env, rows)
    ref_v, _ = logp.topk(k, -1)
    # the stored ids carry the teacher's exact top-k log-probs, largest first (robust to exact ties)
    torch.testing.assert_close(e["logprobs"].double(), ref_v, atol=1e-5, rtol=0)
    torch.testing.assert_close(logp.gather(1, e["ids"]), ref_v, atol=1e-5, rtol=0)
    ref_tail = torch.logsumexp(logp.scatter(1, e["ids"], float("-inf")), -1)
    torch.testing.assert_close(e["log_tail"].double(), ref_tail, atol=1e-5, rtol=0)
    mass = e["logprobs"].double().exp().sum(-1) + e["log_tail"].double().exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)  # top-k + tail = 1
    assert (ref_tail.exp() > 0.1).all()  # the tail is a real share of the mass here
    if fmt == "topk_bucket":
        assert set(e) == {"logprobs", "ids", "log_tail"}
        return
    ref_entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(e["entropy"].double(), ref_entropy, atol=1e-4, rtol=0)
    every = stored(out, env["rows"], env["rows"])  # all positions of the split: no draw lands in the top-k
    assert every["draw_ids"].shape == (len(every["ids"]), 64)
    assert not (every["draw_ids"][:, :, None] == every["ids"][:, None, :]).any()
    assert len(every["draw_ids"].unique()) > 4 * k  # spread over the tail, not stuck on a few ids


def small(env, shards: int, *extra) -> list[str]:
    """The 20-sample split, one sample per teacher forward: a sample's logits then do not depend on its
    batch-mates' padding, so caches with different shardings must agree bit for bit."""
    return [f"data.path={env['small']}", f"teacher.num_shards={shards}", "teacher.batch_size=1", *extra]


def test_draws_depend_on_the_seed_and_sample_only(env):
    """Same seed, another sharding: the same bytes per sample; another seed: the same top-k, other draws."""
    a, b, c = (cache(env, name, *small(env, *args)) for name, args in
               (("small_8", (8,)), ("small_3", (3,)), ("small_8_seed1", (8, "teacher.seed=1"))))
    cfg = load_config(None, env["base"] + [f"data.path={env['small']}"])
    rows = build_train_examples(env["tok"], load_split(cfg.data, "train"), "kl", "all", 64)
    ea, eb, ec = (stored(d, rows, rows) for d in (a, b, c))
    assert all(torch.equal(ea[key], eb[key]) for key in ea)
    assert all(torch.equal(ea[key], ec[key]) for key in ea if key != "draw_ids")
    assert (ea["draw_ids"] == ec["draw_ids"]).float().mean() < 0.5


def test_sharded_and_resumed_equals_one_shot_byte_for_byte(env):
    one = cache(env, "one_shot")
    parts = env["root"] / "parts"
    for i in (2, 0):  # array tasks, out of order
        assert cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={parts}", "--shard", str(i),
                         "--num-shards", str(N_SHARDS)]) == 0
    assert not (parts / "manifest.json").exists()  # not all shards yet
    victim = parts / f"shard-00002-of-{N_SHARDS:05d}.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])  # a shard cut off after its sidecar was written is redone
    assert cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={parts}", "--num-shards", str(N_SHARDS)]) == 0
    names = sorted(p.name for p in one.glob("shard-*.safetensors"))
    assert names == sorted(p.name for p in parts.glob("shard-*.safetensors")) and len(names) == N_SHARDS
    for n in names:
        assert (one / n).read_bytes() == (parts / n).read_bytes()
    assert "draw_ids" in load_file(one / names[0])  # the default format: draws included in the comparison
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (one, parts))
    assert a["fingerprint_sha256"] == b["fingerprint_sha256"] and a["shards"] == b["shards"]


def test_caches_with_ids_in_their_headers_stay_readable(env, tmp_path):
    """The earlier layout stored each shard's sample ids in its header; the reader still binds rows by them."""
    src, old = cache(env, "one_shot"), tmp_path / "ids_in_header"
    shutil.copytree(src, old)
    manifest = json.loads((old / "manifest.json").read_text())
    for i, entry in enumerate(manifest["shards"]):
        path = old / entry["file"]
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
        first, n = int(meta.pop("first_sample")), int(meta.pop("num_samples"))
        meta.pop("sample_ids_sha256")
        ids = [r["id"] for r in env["rows"][first: first + n]]
        save_file({**tensors, "offsets": tensors["offsets"].long()}, str(path), {**meta, "sample_ids": json.dumps(ids)})
        entry.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    (old / "manifest.json").write_text(json.dumps(manifest))
    rows = env["rows"][::7]
    a, b = stored(src, rows, env["rows"]), stored(old, rows, [])  # no split needed: the header names the rows
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bytes_per_position(env):
    hybrid = json.loads((cache(env, "one_shot") / "manifest.json").read_text())
    # k=32, m=64, fp16: 32*2 + 32*3 + 64*3 + 4 + 4 = 360 B, plus per-sample offsets and headers
    assert hybrid["fingerprint"]["top_k"] == 32 and hybrid["fingerprint"]["samples"] == 64
    assert 360 <= hybrid["bytes_per_position"] <= 400
    old = json.loads((cache(env, "k64_bucket", "teacher.format=topk_bucket", "teacher.top_k=64")
                      / "manifest.json").read_text())
    assert 324 <= old["bytes_per_position"] < 400  # 64*2 + 64*3 + 4 = 324 B


def test_twenty_samples_in_eight_shards(env, capsys):
    out = cache(env, "small_8", *small(env, 8))
    shards = sorted(out.glob("shard-*-of-00008.safetensors"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(shards) == 8 and manifest["num_shards"] == 8 and manifest["num_samples"] == 20
    assert sorted(s["samples"] for s in manifest["shards"]) == [2, 2, 2, 2, 3, 3, 3, 3]  # balanced, none empty
    stamp = [p.stat().st_mtime_ns for p in shards]
    capsys.readouterr()
    assert cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={out}", *small(env, 8)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in shards] == stamp
    code = cli.main(["cache-teacher", *env["base"], f"teacher.cache_dir={env['root'] / 'too_many'}",
                     *small(env, 21)])
    assert code == 2 and "'teacher.num_shards' = 21" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- refusals

def train_args(env, tmp_path, name: str, cache_dir: Path, *extra) -> list[str]:
    return ["train", *env["base"], f"train.student={env['root'] / 'pruned'}", "teacher.source=cache",
            f"teacher.cache_dir={cache_dir}", "train.max_steps=2", "train.eval_after=false",
            f"train.output_dir={tmp_path / name}", *extra]


def test_damaged_or_incomplete_caches_are_refused(env, tmp_path, capsys):
    src = cache(env, "one_shot")
    shard = "shard-00001-of-00004.safetensors"
    cut = tmp_path / "truncated"
    shutil.copytree(src, cut)
    (cut / shard).write_bytes((cut / shard).read_bytes()[:-7])
    with pytest.raises(CacheError, match=f"{shard}: .* bytes, the manifest says"):
        TeacherCache.open(cut)
    assert cli.main(train_args(env, tmp_path, "r0", cut)) == 2
    assert "the manifest says" in one_error_line(capsys.readouterr().err)

    flipped = tmp_path / "flipped"
    shutil.copytree(src, flipped)
    data = bytearray((flipped / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, header intact: only the checksum can tell
    (flipped / shard).write_bytes(bytes(data))
    assert cli.main(train_args(env, tmp_path, "r1", flipped)) == 2  # refused before any step
    assert f"{shard}: checksum mismatch" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "r1" / "metrics.jsonl").exists()
    verify = ["cache-teacher", *env["base"]]
    assert cli.main(verify + [f"teacher.cache_dir={flipped}", "--verify"]) == 2
    assert f"{shard}: checksum mismatch" in one_error_line(capsys.readouterr().err)
    assert cli.main(verify + [f"teacher.cache_dir={src}", "--verify"]) == 0
    assert "every shard matches its sha256" in capsys.readouterr().out

    c = TeacherCache.open(src)
    split = [r["id"] for r in env["rows"]]
    with pytest.raises(CacheError, match="lacks 1 training samples"):
        c.check(c.manifest["fingerprint"], [split[0], "not-a-sample"], split)
    swapped = split[:]
    swapped[0], swapped[-1] = swapped[-1], swapped[0]  # the same ids in another order: rows would be mismatched
    with pytest.raises(CacheError, match=r"shard-00000-of-00004.safetensors: written for training samples 0\.\.9 "):
        c.check(c.manifest["fingerprint"], split, swapped)
    incomplete = tmp_path / "incomplete"
    shutil.copytree(src, incomplete)
    (incomplete / "manifest.json").unlink()
    with pytest.raises(CacheError, match="no manifest.json"):
        TeacherCache.open(incomplete)


def test_a_flipped_byte_in_any_tensor_of_a_shard_is_refused_on_read(env, tmp_path):
    """One byte changed inside each stored tensor in turn (log-probs, ids, draws, offsets, ...): the reader's
    checksum refuses every one, naming the shard; the untouched cache opens."""
    src = cache(env, "one_shot")
    shard = "shard-00002-of-00004.safetensors"
    start, header = read_header(src / shard)
    tensors = {k: v["data_offsets"] for k, v in header.items() if k != "__metadata__"}
    assert {"offsets", "draw_ids"} <= set(tensors) and len(tensors) >= 5
    bad = tmp_path / "bad"
    for name, (begin, end) in tensors.items():
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(src, bad)
        data = bytearray((bad / shard).read_bytes())
        data[start + (begin + end) // 2] ^= 0x01  # one bit, mid-tensor
        (bad / shard).write_bytes(bytes(data))
        with pytest.raises(CacheError, match=f"{shard}: checksum mismatch"):
            TeacherCache.open(bad)
    TeacherCache.open(src)


def test_runs_the_cache_does_not_fit_are_refused(env, tmp_path, capsys):
    src = cache(env, "one_shot")
    cases = [(["train.temperature=2.0"], "temperature: cache 1.0 vs run 2.0"),
             (["train.positions=answer"], "positions: cache all vs run answer"),
             (["teacher.top_k=16"], "top_k: cache 32 vs run 16"),
             (["train.loss=jsd"], "config field 'teacher.source' = 'cache'")]
    for i, (extra, message) in enumerate(cases):
        assert cli.main(train_args(env, tmp_path, f"r{i}", src, *extra)) == 2
        assert message in one_error_line(capsys.readouterr().err)
    # a student pruned from another teacher: the cache's teacher fingerprint differs
    other = _tiny(env["tok"], 9, inter=96)
    other.save_pretrained(tmp_path / "other")
    env["tok"].save_pretrained(tmp_path / "other")
    prune_checkpoint(tmp_path / "other", tmp_path / "other_pruned", 0.25, log=lambda *a: None)
    assert cli.main(train_args(env, tmp_path, "foreign", src, f"train.student={tmp_path / 'other_pruned'}")) == 2
    assert "does not match this run: teacher: cache" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- exactness at k >= V

def full_cache(env, fmt: str) -> Path:
    return cache(env, f"full_{fmt}", f"teacher.format={fmt}", "teacher.dtype=float32", f"teacher.top_k={env['vocab']}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_full_vocab_cache_loss_equals_live_fused_loss(env, fmt):
    c = TeacherCache.open(full_cache(env, fmt))
    rows = env["rows"][:6]
    c.check(c.manifest["fingerprint"], [r["id"] for r in rows], [r["id"] for r in env["rows"]])
    b = collate(rows, env["tok"].pad_token_id, "cpu")
    teacher, student = (load_causal_lm(str(env["root"] / d)) for d in ("teacher", "pruned"))
    spec = LossSpec("kl")

    def hidden(lm):
        out = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        return out[b["rows"], b["cols"]]

    with torch.no_grad(), CachedTeacher(c).targets(b, rows) as sparse:
        hs, w = hidden(student), student.lm_head.weight
        live = fused_linear_loss(hs, w, spec, teacher=DenseTeacher(hidden(teacher), teacher.lm_head.weight))
        cached = fused_linear_loss(hs, w, spec, teacher=sparse, chunk_size=50)
    assert live.item() > 0.1
    assert abs(cached.item() - live.item()) / live.item() < 1e-6


@pytest.fixture(scope="module")
def live_run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("live") / "run"
    assert cli.main(train_common(env) + ["teacher.source=live", f"train.output_dir={out}"]) == 0
    return out


def train_common(env) -> list[str]:
    return ["train", *env["base"], f"train.student={env['root'] / 'pruned'}", "train.max_steps=4",
            "train.micro_batch_size=4", "train.lr=1e-3", "train.warmup_steps=1", "train.save_every=0",
            "train.eval_after=false", "teacher.dtype=float32", f"teacher.top_k={env['vocab']}"]


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("fmt", FORMATS)  # topk_bucket: the old format is still readable and trainable
def test_training_from_full_vocab_cache_matches_live_teacher(env, live_run, tmp_path, fmt):
    src = full_cache(env, fmt)
    run = tmp_path / "cache"
    assert cli.main(train_common(env) + ["teacher.source=cache", f"teacher.format={fmt}", f"teacher.cache_dir={src}",
                                         f"train.output_dir={run}"]) == 0
    live, cached = losses(live_run), losses(run)
    assert len(live) == 4 and live[-1] < live[0]  # it trains
    assert cached == pytest.approx(live, rel=1e-5)
    meta = json.loads((run / "run_meta.json").read_text())["teacher"]
    manifest = json.loads((src / "manifest.json").read_text())
    assert meta["source"] == "cache" and meta["fingerprint"] == manifest["fingerprint_sha256"]
    assert meta["format"] == manifest["format"]


def test_cloze_kl_rows_cached_and_trained_as_live(env, tmp_path):
    """data.format=cloze: the cache holds the packed rows' positions (prompt and every choice), one entry
    each, and training from it follows the live teacher on the same packed batches."""
    cloze = ["data.format=cloze", "train.positions=answer"]
    src = cache(env, "full_cloze", *cloze, "teacher.format=hybrid", "teacher.dtype=float32",
                f"teacher.top_k={env['vocab']}")
    manifest = json.loads((src / "manifest.json").read_text())
    rows = build_train_examples(env["tok"], load_split(load_config(None, env["base"]).data, "train"), "kl", "answer",
                                64, fmt="cloze")
    assert any(sum(r["blocks"]) for r in rows)
    assert manifest["num_positions"] == sum(len(r["positions"]) for r in rows)
    assert manifest["fingerprint"]["kl_rows"] == "prompt + every choice, packed"
    runs = {}
    for source in ("live", "cache"):
        runs[source] = tmp_path / source
        assert cli.main(train_common(env) + cloze + [f"teacher.source={source}", "teacher.format=hybrid",
                                                     f"teacher.cache_dir={src}",
                                                     f"train.output_dir={runs[source]}"]) == 0
    live, cached = losses(runs["live"]), losses(runs["cache"])
    assert len(live) == 4 and live[-1] < live[0]
    assert cached == pytest.approx(live, rel=1e-5)


# ---------------------------------------------------------------- ranks

@pytest.mark.multirank
def test_two_rank_zero3_caching_equals_single_process(env):
    args = ["teacher.dtype=float32", "teacher.top_k=8"]
    single = cache(env, "exact_hybrid", "teacher.format=hybrid", *args)
    multi = env["root"] / "zero3"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "-m", "distill_dist.cli", "cache-teacher", *env["base"],
         f"teacher.cache_dir={multi}", *args,
         "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "rank 1: cached" in proc.stdout  # the second rank really computed shards
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (single, multi))
    assert a["fingerprint_sha256"] == b["fingerprint_sha256"]
    for s in a["shards"]:
        ta, tb = load_file(single / s["file"]), load_file(multi / s["file"])
        assert ta.keys() == tb.keys()
        for key in ("ids", "draw_ids", "offsets"):
            assert torch.equal(ta[key], tb[key]), key
        for key in ("logprobs", "log_tail", "entropy"):
            torch.testing.assert_close(ta[key], tb[key], atol=1e-5, rtol=0)
