"""`distill-dist export`: a checkpoint -> llama.cpp GGUF files, one per `export.types`, + manifest.json.

What an edge user deploys is a quantized file in an edge runtime, not a PyTorch checkpoint. The files come
from llama.cpp's own tools at the version of the installed runtime: its HF -> GGUF converter
(`convert_hf_to_gguf.py`, which the pip package lacks: setup.sh extracts it with its `conversion/` package
and `gguf-py` from the same-version sdist into .edge/llama.cpp-<version>/) writes f32 once, and its
quantizer (`llama_model_quantize`) makes every other type from that f32 file.

1. The source must be a Hugging Face checkpoint dir. The converter reads a staged view of it (symlinks);
   tied embeddings stored only as `lm_head.weight` (TinyStories-656K and its pruned copies) are staged as
   `model.embed_tokens.weight`: as stored, they convert but llama.cpp refuses to load the file.
2. The converter runs in a subprocess; its last error line becomes ours (an unsupported architecture, a
   tokenizer it does not recognise: `export.pre_tokenizer` names one for it).
3. Each tensor's effective type is read back with gguf-py's GGUFReader: K-quants need row widths divisible by
   256, Q4_0/Q8_0 by 32, and llama.cpp quietly gives other tensors another type (`prune.round_to` 256 avoids it).
4. Every file is written under a temporary name and renamed; manifest.json is rewritten after each one. A
   re-run skips the files whose size and sha256 the manifest records and redoes the rest.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from . import llamacpp
from .errors import CheckpointError, ConfigError
from .fileio import atomic_write_json, sha256_file
from .hf_checkpoint import PLAN_FILE, checkpoint_files, checkpoint_fingerprint, load_plan, read_model_config

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "distill_dist.gguf_export/v1"
EDGE_DIR = Path(__file__).resolve().parents[2] / ".edge"  # setup.sh puts llama.cpp's converter here
# Row width a type's blocks need (ggml's block sizes); a tensor whose rows are not a multiple falls back.
BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q5_0": 32, "q4_0": 32, "q6_k": 256, "q5_k_m": 256,
         "q4_k_m": 256}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
# Runs the converter's own CLI; when pre is set and the converter does not recognise the tokenizer's
# pre-tokenizer, it takes that llama.cpp name instead of stopping (a recognised one is never overridden).
_CONVERT = """
import runpy, sys
script, pre, args = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path.insert(0, script.rsplit("/", 1)[0])
if pre:
    import conversion.base as base
    detect = base.TextModel.get_vocab_base_pre
    def get_vocab_base_pre(self, tokenizer):
        try:
            return detect(self, tokenizer)
        except NotImplementedError:
            return pre
    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def gguf_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def converter_dir() -> Path:
    """.edge/llama.cpp-<installed llama-cpp-python version>/, which setup.sh fills from the same sdist."""
    llamacpp.runtime()
    d = EDGE_DIR / f"llama.cpp-{llamacpp.version()}"
    if not (d / "convert_hf_to_gguf.py").is_file() or not (d / "gguf-py").is_dir():
        raise ConfigError(f"llama.cpp's converter for llama-cpp-python {llamacpp.version()} is not in {d}; "
                          "run `bash setup.sh` (it extracts it from the same-version sdist)")
    return d


def gguf_reader(path: Path):
    """gguf-py's GGUFReader, from the converter's own copy of gguf-py (the same llama.cpp version)."""
    gguf_py = str(converter_dir() / "gguf-py")
    if gguf_py not in sys.path:
        sys.path.insert(0, gguf_py)
    import gguf

    return gguf.GGUFReader(str(path))


def bytes_per_token(path: Path) -> int:
    """Weight bytes one generated token reads (decoding on a CPU is bound by them): every tensor but the token
    embedding, of which a token reads one row, unless the embedding is also the output matrix (tied)."""
    tensors = {t.name: int(t.n_bytes) for t in gguf_reader(path).tensors}
    if "output.weight" in tensors:
        return sum(tensors.values()) - tensors["token_embd.weight"]
    return sum(tensors.values())


def describe_gguf(path: Path, gguf_type: str) -> dict:
    """Effective type of every tensor, counts per type, the tensors whose rows the type's blocks do not fit
    (they fell back to another type), and the pre-tokenizer the file declares."""
    r = gguf_reader(path)
    types = {t.name: t.tensor_type.name for t in r.tensors}
    fallback = {t.name: t.tensor_type.name for t in r.tensors
                if len(t.shape) >= 2 and int(t.shape[0]) % BLOCK[gguf_type] != 0}
    counts: dict[str, int] = {}
    for name in types.values():
        counts[name] = counts.get(name, 0) + 1
    pre = r.fields.get("tokenizer.ggml.pre")
    return {"params": int(sum(int(t.n_elements) for t in r.tensors)), "tensor_types": types, "type_counts": dict(sorted(counts.items())), "fallback_tensors": fallback,
            "pre_tokenizer": bytes(pre.parts[pre.data[0]]).decode() if pre is not None else None}


def _stage(src: Path, mcfg: dict, stage: Path) -> None:
    """A converter-ready view of src in `stage`: symlinks, with tied embeddings written as token embeddings."""
    stage.mkdir(parents=True)
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            (stage / p.name).symlink_to(p.resolve())
    if not mcfg.get("tie_word_embeddings", False):
        return
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shards = [p for p in checkpoint_files(src) if p.suffix == ".safetensors"]
    names = {p: set(safe_open(str(p), "pt").keys()) for p in shards}
    if any("model.embed_tokens.weight" in n for n in names.values()):
        return
    holder = next((p for p, n in names.items() if "lm_head.weight" in n), None)
    if holder is None:
        return
    tensors = load_file(str(holder))
    tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    (stage / holder.name).unlink()
    save_file(tensors, str(stage / holder.name), metadata={"format": "pt"})
    index = src / "model.safetensors.index.json"
    if index.is_file():
        idx = json.loads(index.read_text())
        idx["weight_map"]["model.embed_tokens.weight"] = idx["weight_map"].pop("lm_head.weight")
        (stage / index.name).unlink()
        (stage / index.name).write_text(json.dumps(idx))


def convert_f32(src: Path, mcfg: dict, out: Path, pre_tokenizer: str | None) -> float:
    """llama.cpp's converter, src -> f32 GGUF at `out`; seconds taken. One error line if it fails."""
    script = converter_dir() / "convert_hf_to_gguf.py"
    work = out.parent / f".{out.name}.stage-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    try:
        _stage(src, mcfg, work / "model")
        cmd = [sys.executable, "-c", _CONVERT, str(script), pre_tokenizer or "", str(work / "model"),
               "--outtype", "f32", "--outfile", str(work / "out.gguf")]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not (work / "out.gguf").is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise CheckpointError(f"{src}: llama.cpp's converter failed: {lines[-1] if lines else proc.returncode}")
        os.replace(work / "out.gguf", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return time.time() - t0


def _source(src: Path) -> tuple[dict, dict]:
    """(the model config, the manifest's record of the source), refusing anything that is not a checkpoint."""
    if not src.is_dir():
        raise CheckpointError(f"{src}: no such checkpoint directory")
    mcfg = read_model_config(src)
    checkpoint_files(src)
    plan = load_plan(src)["plan_sha256"] if (src / PLAN_FILE).is_file() else None
    has_tok = any((src / f).is_file() for f in _TOKENIZER_FILES)
    return mcfg, {"path": str(src.resolve()), "fingerprint": checkpoint_fingerprint(src),
                  "architecture": mcfg["architectures"][0], "intermediate_size": mcfg["intermediate_size"],
                  "hidden_size": mcfg["hidden_size"], "pruning_plan_sha256": plan,
                  "tokenizer": str(src.resolve()) if has_tok else None}


def _load_manifest(out_dir: Path, source: dict) -> dict:
    path = out_dir / MANIFEST
    fresh = {"format": MANIFEST_FORMAT, "source": source, "llama_cpp_python": llamacpp.version(), "files": {}}
    if not path.is_file():
        if out_dir.is_dir() and any(p.suffix == ".gguf" for p in out_dir.iterdir()):
            raise CheckpointError(f"{out_dir} holds GGUF files without a {MANIFEST}; choose another export.output_dir")
        return fresh
    old = json.loads(path.read_text())
    if old.get("source", {}).get("fingerprint") != source["fingerprint"]:
        raise CheckpointError(f"{out_dir} holds an export of another checkpoint ({old.get('source', {}).get('path')}); "
                              "choose another export.output_dir")
    if old.get("llama_cpp_python") != fresh["llama_cpp_python"]:
        return fresh  # another llama.cpp: every file is redone
    return fresh | {"files": old.get("files", {})}


def _complete(out_dir: Path, rec: dict | None) -> bool:
    """Is the file the manifest records there, whole (size and sha256)?"""
    if not rec:
        return False
    p = out_dir / rec["file"]
    return p.is_file() and p.stat().st_size == rec["bytes"] and sha256_file(p) == rec["sha256"]


def export(src: str | os.PathLike, out_dir: str | os.PathLike, types: list[str], pre_tokenizer: str | None = None,
           threads: int = 0, log=print) -> dict:
    """Write out_dir/model-<type>.gguf for each type and out_dir/manifest.json; returns the manifest."""
    src, out_dir = Path(src), Path(out_dir)
    mcfg, source = _source(src)
    manifest = _load_manifest(out_dir, source)
    todo = [t for t in types if not _complete(out_dir, manifest["files"].get(t))]
    for t in types:
        if t not in todo:
            log(f"{out_dir / gguf_name(t)}: complete (sha256 matches {MANIFEST}); skipped")
    if not todo:
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    f32 = out_dir / f".converted-f32.gguf.tmp-{os.getpid()}"
    try:
        convert_s = convert_f32(src, mcfg, f32, pre_tokenizer)
        log(f"converted {src} -> f32 GGUF with llama.cpp's converter ({convert_s:.1f}s)")
        for t in sorted(todo, key=lambda t: t == "f32"):  # f32 last: the converted file itself is moved into place
            manifest["files"][t] = _write_type(f32, out_dir, t, threads, convert_s)
            atomic_write_json(out_dir / MANIFEST, manifest)
            rec = manifest["files"][t]
            fb = f", {len(rec['fallback_tensors'])} tensors fell back to another type" if rec["fallback_tensors"] else ""
            log(f"{out_dir / rec['file']}: {rec['bytes'] / 1e6:.2f} MB ({rec['seconds']:.1f}s){fb}")
    finally:
        f32.unlink(missing_ok=True)
    return manifest


def _write_type(f32: Path, out_dir: Path, gguf_type: str, threads: int, convert_s: float) -> dict:
    """One GGUF file from the converted f32 one (f32 itself: that file), renamed into place when whole."""
    final = out_dir / gguf_name(gguf_type)
    tmp = out_dir / f".{final.name}.tmp-{os.getpid()}"
    t0 = time.time()
    try:
        if gguf_type == "f32":
            os.replace(f32, tmp)
        else:
            llamacpp.quantize(f32, tmp, gguf_type, threads)
        info = describe_gguf(tmp, gguf_type)
        rec = {"file": final.name, "type": gguf_type, "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp),
               "seconds": time.time() - t0 + (convert_s if gguf_type == "f32" else 0.0), **info}
        os.replace(tmp, final)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{final}: writing {gguf_type} failed ({e}); nothing was kept, re-run to retry") from None
    finally:
        tmp.unlink(missing_ok=True)
    return rec


def read_manifest(gguf_path: Path) -> tuple[dict, dict]:
    """(manifest, this file's record) for a GGUF that `distill-dist export` wrote."""
    path = gguf_path.parent / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{gguf_path}: no {MANIFEST} beside it (not written by `distill-dist export`)")
    manifest = json.loads(path.read_text())
    rec = next((r for r in manifest.get("files", {}).values() if r["file"] == gguf_path.name), None)
    if rec is None:
        raise CheckpointError(f"{gguf_path}: not listed in {path}")
    return manifest, rec
