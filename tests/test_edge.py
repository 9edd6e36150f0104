"""The edge path: `distill-dist export` (llama.cpp's converter and quantizer) and `eval.backend=llamacpp`.

A pruned TinyStories-656K (a real pretrained Llama with tied embeddings) and a pruned tiny OLMo2 with the real
OLMo2 tokenizer go to f32 GGUF; their per-choice log-likelihoods in llama.cpp equal transformers' within
PARITY_TOL on PARITY_QUESTIONS real CommonsenseQA dev questions, on the same token ids. Q8_0 and Q4_K_M load
and score; their accuracy deltas are printed, not asserted. Bad inputs end in one line and exit status 2; a
failure half-way leaves nothing a re-run takes as done; a re-run skips complete files.
Skips where llama_cpp, its converter (.edge/, from setup.sh) or ../shared is missing.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="the llama.cpp runtime is not installed (bash setup.sh installs it)")

from conftest import REPO_ROOT, make_tiny_model  # noqa: E402
from distill_dist import cli, export as export_mod, llamacpp  # noqa: E402
from distill_dist.config import load_config  # noqa: E402
from distill_dist.errors import ConfigError  # noqa: E402
from distill_dist.evaluate import (build_requests, choice_lengths, eval_split, evaluate_gguf,  # noqa: E402
                                   results_from_logliks, score_rows)
from distill_dist.fileio import sha256_file  # noqa: E402
from distill_dist.hf_checkpoint import checkpoint_fingerprint, load_plan  # noqa: E402
from distill_dist.models import load_causal_lm, load_tokenizer  # noqa: E402
from distill_dist.plan import ModelShape  # noqa: E402
from distill_dist.prune import prune_checkpoint  # noqa: E402

PARITY_QUESTIONS = 300
PARITY_TOL = 1e-3  # nats per choice, f32 GGUF with an f32 KV cache against transformers in float32
TYPES = ["f32", "q8_0", "q4_k_m"]


@pytest.fixture(scope="module", autouse=True)
def converter():
    try:
        return export_mod.converter_dir()
    except ConfigError as e:
        pytest.skip(str(e))


def _cfg(csqa_dir, out: Path, *extra: str):
    return load_config(None, [f"data.path={csqa_dir}", "data.max_length=512", f"eval.limit={PARITY_QUESTIONS}",
                              "eval.split=validation", "eval.threads=[1]", f"output_dir={out}", *extra])


def _export_and_score(ckpt: Path, out: Path, csqa_dir) -> dict:
    """Export ckpt at TYPES, score each file in llama.cpp and the checkpoint in transformers on the same questions."""
    manifest = export_mod.export(ckpt, out / "gguf", TYPES, threads=1, log=lambda *a: None)
    cfg = _cfg(csqa_dir, out)
    res = {"manifest": manifest, "cfg": cfg}
    for t in TYPES:
        evaluate_gguf(cfg, str(out / "gguf" / export_mod.gguf_name(t)), out / f"eval-{t}")
        res[t] = [json.loads(line) for line in (out / f"eval-{t}" / "examples.jsonl").read_text().splitlines()]
        res[t + "_eval"] = json.loads((out / f"eval-{t}" / "eval.json").read_text())
    tok = load_tokenizer(str(ckpt))
    rows = list(eval_split(cfg))
    res["torch"] = score_rows(load_causal_lm(str(ckpt)), tok, rows, 32, cfg.data.max_length, "cpu", progress=False)
    res["requests"] = build_requests(tok, rows, cfg.data.max_length)
    return res


@pytest.fixture(scope="module")
def tinystories(tmp_path_factory, tinystories_dir, csqa_dir):
    root = tmp_path_factory.mktemp("edge_ts")
    prune_checkpoint(tinystories_dir, root / "pruned", 0.5, log=lambda *a: None)
    return root / "pruned", _export_and_score(root / "pruned", root, csqa_dir)


@pytest.fixture(scope="module")
def olmo2(tmp_path_factory, olmo2_tokenizer, csqa_dir):
    root = tmp_path_factory.mktemp("edge_olmo2")
    model = make_tiny_model(olmo2_tokenizer, "olmo2", seed=3, inter=256)
    model.save_pretrained(root / "teacher")
    olmo2_tokenizer.save_pretrained(root / "teacher")
    prune_checkpoint(root / "teacher", root / "pruned", 0.5, log=lambda *a: None)
    return root / "pruned", _export_and_score(root / "pruned", root, csqa_dir)


def _check_parity(name: str, ckpt: Path, res: dict) -> None:
    ours = np.array([r["logliks"] for r in res["f32"]])
    assert len(ours) == PARITY_QUESTIONS
    diff = np.abs(ours - res["torch"]).max()
    agree = (ours.argmax(1) == res["torch"].argmax(1)).mean()
    print(f"\n{name}: f32 GGUF vs transformers on {len(ours)} questions: max |dloglik| {diff:.2e} "
          f"(tolerance {PARITY_TOL}), argmax agreement {agree:.3f}")
    assert diff < PARITY_TOL
    # the same token ids: the GGUF eval tokenizes with the exported checkpoint's tokenizer (from the manifest)
    manifest_tok = load_tokenizer(res["manifest"]["source"]["tokenizer"])
    again = build_requests(manifest_tok, list(eval_split(res["cfg"])), res["cfg"].data.max_length)
    assert [r.input_ids for r in again] == [r.input_ids for r in res["requests"]]
    assert [r.targets for r in again] == [r.targets for r in res["requests"]]
    f32_acc = res["f32_eval"]["metrics"]["acc"]
    for t in TYPES[1:]:
        ev = res[t + "_eval"]
        rows = np.array([r["logliks"] for r in res[t]])
        print(f"{name} {t}: acc {ev['metrics']['acc']:.4f} (f32 {f32_acc:.4f}, delta {ev['metrics']['acc'] - f32_acc:+.4f}), "
              f"max |dloglik| vs f32 {np.abs(rows - ours).max():.3f}, {ev['edge']['file_bytes'] / 1e6:.2f} MB "
              f"(f32 {res['f32_eval']['edge']['file_bytes'] / 1e6:.2f}), peak RSS {ev['edge']['peak_rss_bytes'] / 1e6:.0f} MB, "
              f"tok/s pp {ev['edge']['speed'][0]['prompt_tok_s']:.0f} tg {ev['edge']['speed'][0]['gen_tok_s']:.0f}")
        assert np.isfinite(rows).all() and ev["metrics"]["n"] == PARITY_QUESTIONS


def test_tinystories_f32_parity_and_quantized(tinystories):
    _check_parity("TinyStories-656K keep 0.5", *tinystories)


def test_olmo2_f32_parity_and_quantized(olmo2):
    _check_parity("tiny OLMo2 (real tokenizer) keep 0.5", *olmo2)


def test_cloze_scored_in_llamacpp_as_in_torch(olmo2_tokenizer, csqa_dir, tmp_path):
    """data.format=cloze with eval.backend=llamacpp: lm-eval's requests (answers of several tokens, one sequence
    per choice), their log-likelihoods within PARITY_TOL of the torch backend's (the prompt shared), the same
    accuracies and headline."""
    src = tmp_path / "model"
    make_tiny_model(olmo2_tokenizer, "olmo2", seed=5, inter=128).save_pretrained(src)
    olmo2_tokenizer.save_pretrained(src)
    export_mod.export(src, tmp_path / "gguf", ["f32"], threads=1, log=lambda *a: None)
    cfg = _cfg(csqa_dir, tmp_path, "data.format=cloze", "eval.limit=40")
    m, _ = evaluate_gguf(cfg, str(tmp_path / "gguf" / export_mod.gguf_name("f32")), tmp_path / "eval")
    lines = (tmp_path / "eval" / "examples.jsonl").read_text().splitlines()
    ours = np.array([json.loads(line)["logliks"] for line in lines])
    rows = list(eval_split(cfg))
    reqs = build_requests(olmo2_tokenizer, rows, cfg.data.max_length, fmt="cloze")
    assert any(r.choice is not None and len(r.targets) > 1 for r in reqs)
    ref = score_rows(load_causal_lm(str(src)), olmo2_tokenizer, rows, 32, cfg.data.max_length, "cpu", progress=False,
                     fmt="cloze")
    assert len(ours) == 40 and np.abs(ours - ref).max() < PARITY_TOL
    lengths = choice_lengths(olmo2_tokenizer, rows, "cloze")
    torch_m, _ = results_from_logliks(eval_split(cfg), ref, lengths, "acc_per_char")
    assert m["headline"] == "acc_per_char"
    assert all(m[k] == torch_m[k] for k in ("acc", "acc_per_token", "acc_per_char"))


def test_manifest_records_source_files_and_effective_types(tinystories):
    ckpt, res = tinystories
    m = res["manifest"]
    assert m["source"]["fingerprint"] == checkpoint_fingerprint(ckpt)
    assert m["source"]["pruning_plan_sha256"] == load_plan(ckpt)["plan_sha256"]
    assert m["llama_cpp_python"] == llamacpp.version()
    gguf_dir = Path(res["f32_eval"]["model"]["path"]).parent
    assert sorted(m["files"]) == sorted(TYPES)
    for t, rec in m["files"].items():
        path = gguf_dir / rec["file"]
        assert rec["bytes"] == path.stat().st_size and rec["sha256"] == sha256_file(path)
        # tied embeddings were written out as token embeddings: llama.cpp loads the file and ties the output
        assert "token_embd.weight" in rec["tensor_types"] and "output.weight" not in rec["tensor_types"]
    assert set(m["files"]["f32"]["type_counts"]) == {"F32"} and not m["files"]["f32"]["fallback_tensors"]
    q4 = m["files"]["q4_k_m"]
    # TinyStories' rows are 128 and 192 wide: no K-quant fits, every matrix falls back (and says so)
    assert q4["fallback_tensors"] and all(not v.endswith("_K") for v in q4["fallback_tensors"].values())
    assert m["files"]["q8_0"]["type_counts"].get("Q8_0", 0) > 0
    eval_json = res["q8_0_eval"]
    assert eval_json["backend"] == "llamacpp" and eval_json["model"]["fingerprint"] == m["source"]["fingerprint"]
    assert eval_json["edge"]["kv_cache"] == "f16" and res["f32_eval"]["edge"]["kv_cache"] == "f32"
    for key in ("load_s", "peak_rss_bytes", "file_bytes"):
        assert eval_json["edge"][key] > 0


@pytest.mark.parametrize("which", ["tinystories", "olmo2"])
def test_plan_counts_the_weights_a_generated_token_reads_in_the_gguf(which, request):
    """plan.py's weights per generated token, from config.json alone, equal the f32 GGUF's tensor bytes / 4
    minus the embedding where the file has its own output matrix: a tied Llama (the embedding is read whole
    as the output matrix) and an untied OLMo 2 (q/k norms included)."""
    ckpt, res = request.getfixturevalue(which)
    gguf = Path(res["f32_eval"]["model"]["path"])
    shape = ModelShape.from_config(json.loads((ckpt / "config.json").read_text()))
    assert export_mod.bytes_per_token(gguf) == 4 * shape.params_per_token()
    assert shape.tied == (which == "tinystories")  # both cases are covered


def test_rerun_skips_complete_files_and_redoes_damaged_ones(tinystories, tmp_path):
    ckpt, res = tinystories
    gguf_dir = Path(res["f32_eval"]["model"]["path"]).parent
    logs: list[str] = []
    again = export_mod.export(ckpt, gguf_dir, TYPES, log=logs.append)
    assert again["files"] == res["manifest"]["files"] and len(logs) == len(TYPES)
    assert all("skipped" in line for line in logs)
    # a half-way failure: q8_0 written, q4_k_m fails -> no q4_k_m file, no temporary left, manifest without it
    out = tmp_path / "gguf"
    real = llamacpp.quantize

    def failing(src, dst, gguf_type, threads=0):
        if gguf_type == "q4_k_m":
            Path(dst).write_bytes(b"partial")
            raise RuntimeError("No space left on device")
        return real(src, dst, gguf_type, threads)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(llamacpp, "quantize", failing)
        with pytest.raises(export_mod.CheckpointError, match="q4_k_m failed .*No space left"):
            export_mod.export(ckpt, out, ["q8_0", "q4_k_m"], log=lambda *a: None)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model-q8_0.gguf"]
    assert list(json.loads((out / "manifest.json").read_text())["files"]) == ["q8_0"]
    # a damaged file is redone, a complete one skipped
    with open(out / "model-q8_0.gguf", "r+b") as f:
        f.truncate(1000)
    logs.clear()
    m = export_mod.export(ckpt, out, ["q8_0", "q4_k_m"], log=logs.append)
    assert m["files"]["q8_0"]["sha256"] == res["manifest"]["files"]["q8_0"]["sha256"]  # reproducible bytes
    assert m["files"]["q4_k_m"]["sha256"] == res["manifest"]["files"]["q4_k_m"]["sha256"]
    assert not any("skipped" in line for line in logs)


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("distill-dist: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_cli_not_a_checkpoint_is_one_line_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, "-m", "distill_dist.cli", "export", f"export.model={tmp_path / 'empty'}",
                           f"export.output_dir={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert "no config.json" in _one_error_line(proc.stderr) and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_unknown_type_and_wrong_backend(tmp_path, capsys, tinystories):
    assert cli.main(["export", "export.model=x", "export.types=[q3_x]"]) == 2
    assert "export.types[0]" in _one_error_line(capsys.readouterr().err)
    gguf = Path(tinystories[1]["f32_eval"]["model"]["path"])
    assert cli.main(["eval", f"eval.model={gguf}"]) == 2
    assert "eval.backend=llamacpp" in _one_error_line(capsys.readouterr().err)
    assert cli.main(["eval", "eval.backend=llamacpp", f"eval.model={tmp_path}"]) == 2
    assert "GGUF file" in _one_error_line(capsys.readouterr().err)


def test_cli_unsupported_architecture(tiny_olmo2_dir, tmp_path, capsys):
    src = tmp_path / "foo"
    src.mkdir()
    for p in tiny_olmo2_dir.iterdir():
        (src / p.name).symlink_to(p)
    (src / "config.json").unlink()
    cfg = json.loads((tiny_olmo2_dir / "config.json").read_text()) | {"architectures": ["FooForCausalLM"],
                                                                        "model_type": "foo"}
    (src / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["export", f"export.model={src}", f"export.output_dir={tmp_path / 'out'}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "llama.cpp's converter failed" in line and "FooForCausalLM" in line, line
    assert not any((tmp_path / "out").glob("*.gguf")) and not any((tmp_path / "out").glob(".*"))
