"""The one module that talks to llama.cpp (llama-cpp-python): its version, its quantizer, and scoring
CommonsenseQA requests inside it with the edge measurements (load time, peak RSS, tokens/s).

It imports only llama_cpp, numpy and the standard library, so the scoring process that
`eval.backend=llamacpp` starts (`python -m distill_dist.llamacpp JOB.json RESULT.json`) holds the runtime
and the model and nothing else: its peak RSS is what a device needs, not what PyTorch needs.

Scoring feeds our token ids (lm-eval's request rule, `evaluate.build_requests`), never text: llama.cpp's
own tokenizer does not give Hugging Face's ids for every tokenizer (TinyStories-656K's differs). Each
request is decoded as one batch (the whole sequence in one llama_decode call, n_batch = n_ubatch = n_ctx),
with logits asked only at the scored positions and read with llama_get_logits_ith: quantized
log-likelihoods depend on how a sequence is split into batches, so the split is fixed. An f32 file gets an
f32 KV cache (llama.cpp's default f16 cache alone moves per-choice log-likelihoods by ~5e-3 nats);
every other type keeps the default f16 cache, as a device would run it.
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import UserError

# export.types -> llama.cpp's llama_ftype (include/llama.h)
FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "q5_0": 8, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "bf16": 32}
GGML_TYPE_F32 = 0
PP_TOKENS, TG_TOKENS, SPEED_REPEATS = 128, 32, 3  # llama-bench's pp/tg, shortened for tiny context windows


class MissingRuntime(UserError):
    pass


def runtime():
    """The llama_cpp module, or one line saying how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise MissingRuntime(f"the llama.cpp runtime is not installed ({e}); run `bash setup.sh` "
                             "(or pip install -e '.[edge]')") from None
    from llama_cpp import _logger

    _logger.set_verbose(False)  # llama.cpp's own log (per-tensor quantizer lines, load details): errors only
    return llama_cpp


def version() -> str:
    from importlib.metadata import version as v

    return v("llama-cpp-python")


def quantize(src: Path, dst: Path, gguf_type: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer (llama-quantize), f32 GGUF -> `gguf_type`."""
    lc = runtime()
    params = lc.llama_model_quantize_default_params()
    params.ftype = FTYPES[gguf_type]
    params.nthread = threads
    with tempfile.TemporaryFile() as log:
        with _redirected_c_output(log):
            rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
        if rc != 0:
            log.seek(0)
            lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
            raise RuntimeError(f"llama_model_quantize -> {gguf_type} returned {rc}: {lines[-1] if lines else ''}")


@contextlib.contextmanager
def _redirected_c_output(target):
    """The C library's stdout/stderr (the quantizer prints a line per tensor and per fallback; the manifest
    records the outcome) into `target`, kept for the error message."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        os.dup2(target.fileno(), 1), os.dup2(target.fileno(), 2)
        yield
    finally:
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """This process image's peak RSS (VmHWM). Not getrusage's ru_maxrss: that one survives exec, so a process
    started from a 500 MB parent with torch loaded would report the parent's memory."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class Session:
    """One loaded GGUF model and context; `decode` runs one batch and returns logits at the asked rows."""

    def __init__(self, path: str, n_ctx: int, threads: int, f32_kv: bool):
        lc = self.lc = runtime()
        kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
        self.llm = lc.Llama(model_path=path, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=threads,
                            n_threads_batch=threads, logits_all=False, verbose=False, **kv)
        self.ctx = self.llm.ctx
        self.n_ctx = n_ctx
        self.n_vocab = self.llm.n_vocab()
        self.batch = lc.llama_batch_init(n_ctx, 0, 1)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.llm.close()

    def set_threads(self, n: int) -> None:
        self.lc.llama_set_n_threads(self.ctx, n, n)

    def clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def decode(self, ids: list[int], start: int, rows: list[int]) -> np.ndarray:
        """Append ids at positions start.. (one llama_decode call); [len(rows), n_vocab] float32 logits."""
        b, want = self.batch, set(rows)
        b.n_tokens = len(ids)
        for i, t in enumerate(ids):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, start + i, 1, i in want
            b.seq_id[i][0] = 0
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {len(ids)} tokens at position {start}")
        return np.stack([np.ctypeslib.as_array(self.lc.llama_get_logits_ith(self.ctx, r), shape=(self.n_vocab,))
                         for r in rows]).copy() if rows else np.zeros((0, self.n_vocab), np.float32)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score(s: Session, requests: list[dict]) -> list[list[list[float]]]:
    """Per request, per scored position, log p(target) for each of its targets (float64 log-softmax)."""
    out = []
    for r in requests:
        s.clear()
        logp = _log_softmax(s.decode(r["ids"], 0, r["positions"]))
        out.append([[float(lp[t]) for t in targets] for lp, targets in zip(logp, r["targets"])])
    return out


def _median_rate(fn, tokens: int) -> float:
    times = []
    for _ in range(SPEED_REPEATS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return tokens / statistics.median(times)


def speed(s: Session, prompt: list[int], threads: int) -> dict:
    """Prompt processing (one batch of pp tokens) and generation (tg greedy tokens, one decode each) in tokens/s,
    the median of SPEED_REPEATS, after one warm-up of each."""
    s.set_threads(threads)
    pp = min(PP_TOKENS, s.n_ctx - TG_TOKENS - 1)
    prompt = (prompt * (pp // max(1, len(prompt)) + 1))[:pp]

    def prefill():
        s.clear()
        return s.decode(prompt, 0, [pp - 1])[0]

    def generate(logits: np.ndarray) -> float:
        t, tok = time.perf_counter(), int(logits.argmax())
        for i in range(TG_TOKENS):
            tok = int(s.decode([tok], pp + i, [0])[0].argmax())
        return TG_TOKENS / (time.perf_counter() - t)

    prefill()
    pp_rate = _median_rate(prefill, pp)
    rates = [generate(prefill()) for _ in range(SPEED_REPEATS + 1)][1:]  # the first is the warm-up
    return {"threads": threads, "prompt_tokens": pp, "prompt_tok_s": pp_rate, "gen_tokens": TG_TOKENS,
            "gen_tok_s": statistics.median(rates)}


def run_job(job: dict) -> dict:
    """Load, score, measure: the whole of one scoring process (see the module docstring)."""
    threads = [t or os.cpu_count() or 1 for t in job["threads"]]
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    s = Session(job["model"], job["n_ctx"], threads[0], job["f32_kv"])
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = score(s, job["requests"])
    score_s = time.perf_counter() - t0
    speeds = [speed(s, job["requests"][0]["ids"], n) for n in threads] if job["requests"] else []
    s.close()
    return {"scores": scores, "edge": {
        "load_s": load_s, "score_s": score_s, "score_threads": threads[0], "rss_before_load_bytes": rss_before,
        "peak_rss_bytes": _peak_rss_bytes(), "n_ctx": job["n_ctx"], "kv_cache": "f32" if job["f32_kv"] else "f16",
        "batching": "one llama_decode per request (whole sequence)", "speed": speeds, "llama_cpp_python": version()}}


def run_isolated(job: dict) -> dict:
    """run_job in a fresh `python -m distill_dist.llamacpp` process (nothing else in its memory); one error line."""
    import subprocess

    with tempfile.TemporaryDirectory(prefix="dd_llamacpp_") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "distill_dist.llamacpp", str(job_file), str(result_file)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not result_file.is_file():
            lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
            raise UserError(f"{job['model']}: llama.cpp failed: {lines[-1] if lines else proc.returncode}")
        return json.loads(result_file.read_text())


def main(argv: list[str] | None = None) -> int:
    job_path, result_path = (argv if argv is not None else sys.argv[1:])
    result = run_job(json.loads(Path(job_path).read_text()))
    Path(result_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
