"""The GPU check: every section in its own process, each result merged into OUT/gpu_check.json the moment it
ends, under one total time budget (bench/gpu_check.sh runs this after installing the wheels).

    python bench/gpu_check.py --out-dir OUT [--work /tmp/dd_gpu_check] [--smoke] [--budget-s 510] [--sections a,b]

Sections, in this order (one whose prerequisite failed or did not run is recorded as skipped, saying which):
  env         versions, the GPU, the packages the wheels folder installed (and that they are the ones imported)
  pytest_gpu  `pytest -m gpu tests/test_gpu.py` (plugin autoload off; its log: OUT/pytest.log)
  losses      Liger's fused kernels vs ours at the OLMo2 head, 2048 x 4096 x 100352, bf16: time, peak memory,
              value and gradient agreement
  inputs      a 2-layer OLMo2 at 7B widths, random bf16, the real OLMo2 tokenizer on CSQA from ../shared/data
              when present, else a synthetic task and its BPE
  prune       distill-dist prune, keep 0.5                              (needs inputs)
  cache       distill-dist cache-teacher for the KL arm                 (needs prune)
  kl_live, kl_cache, ce
              train 20 steps (bf16, grad_accum 2), export, evaluate, under `torchrun --nproc_per_node 1`: step
              time, tokens/s, MFU at --peak-tflops, peak memory against plan.py's prediction
                                                                        (need prune; kl_cache needs cache)
  resume      the kl_cache run (train.deterministic=true) stopped by SIGUSR1 and re-run: bitwise equal to
              kl_cache's uninterrupted losses?                          (needs cache)
  iterative   keep 0.75 -> 0.5 -> 0.25 in one job: each stage's start and peak memory  (needs inputs)

Every section process writes its result (figures, or an error with its traceback) before it exits; one that
crashes, is killed or runs past its share of the budget is recorded as such and the next section runs.
Each section's output goes to OUT/sections.log. --smoke: toy sizes on whatever device there is (CI runs it
on CPU: tests/test_gpu_check.py). DD_GPU_CHECK_FAIL=name[,name]: those sections' processes die at start
(exit 3), as a crash would: how the test proves that one failure loses nothing else.
Figures are printed and written, never asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import prune_7b  # noqa: E402

import torch  # noqa: E402

from distill_dist.plan import (DTYPE_BYTES, Hardware, ModelShape, forward_flops, per_gpu_memory,  # noqa: E402
                               train_flops)

SHARED = REPO.parent / "shared" / "data"
FULL = dict(hidden=4096, intermediate=11008, heads=32, layers=2, head_rows=2048, steps=20, micro=8, train_rows=512,
            dev_rows=64, iter_steps=5)
SMOKE = dict(hidden=64, intermediate=256, heads=4, layers=2, head_rows=64, steps=3, micro=2, train_rows=48,
             dev_rows=8, iter_steps=2)
# name: (the sections it needs, its most seconds at full size). At --smoke only the total budget bounds them.
SECTIONS = {
    "env": ((), 60), "pytest_gpu": ((), 150), "losses": ((), 90), "inputs": ((), 90), "prune": (("inputs",), 90),
    "cache": (("prune",), 120), "kl_live": (("prune",), 150), "kl_cache": (("cache",), 120), "ce": (("prune",), 120),
    "resume": (("cache",), 180), "iterative": (("inputs",), 180),
}
FAIL_ENV = "DD_GPU_CHECK_FAIL"


def atomic_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2))
    tmp.replace(path)


def children_peak_rss_gb() -> float:
    """The largest resident set of any finished child process of this one (torchrun's workers included)."""
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9, 3)


class Check:
    """One section's work, in a process of its own; state between sections lives under work/."""

    def __init__(self, work: Path, out_dir: Path, size: dict, peak_tflops: float):
        self.work, self.out_dir, self.size, self.peak_tflops = work, out_dir, size, peak_tflops
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    # ------------------------------------------------------------ env

    def env(self) -> dict:
        import deepspeed
        import transformers

        out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
               "deepspeed": deepspeed.__version__, "transformers": transformers.__version__, "device": self.device}
        if self.device == "cuda":
            p = torch.cuda.get_device_properties(0)
            out.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 1e9, 1), gpus=torch.cuda.device_count())
        try:
            import liger_kernel  # noqa: F401
            from importlib.metadata import version

            out["liger_kernel"] = version("liger-kernel")
        except ImportError:
            out["liger_kernel"] = None
        out["site"] = self.site_packages()
        return out

    @staticmethod
    def site_packages() -> dict | None:
        """The packages gpu_check.sh installed from the wheels (pip --target), and whether the one this Python
        resolves for each name is that copy (the site folder comes first on PYTHONPATH)."""
        import importlib.metadata as md

        site = os.environ.get("DD_GPU_CHECK_SITE")
        if not site:
            return None
        installed = {d.metadata["Name"]: d.version for d in md.distributions(path=[site])}
        resolved = {n: str(md.distribution(n).locate_file("")).startswith(site) for n in installed}
        return {"path": site, "installed": installed, "all_resolved_there": all(resolved.values()),
                "resolved_elsewhere": sorted(n for n, ok in resolved.items() if not ok)}

    # ------------------------------------------------------------ pytest -m gpu

    def pytest_gpu(self) -> dict:
        """tests/test_gpu.py (skipped without CUDA) with the shipped pytest and no plugin autoloading (the
        image's own plugins target another pytest)."""
        log = self.out_dir / "pytest.log"
        env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py",
                                 "-p", "no:cacheprovider"], cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                                env=env).returncode
        lines = [l for l in log.read_text(errors="replace").splitlines() if l.strip()]
        out = {"rc": rc, "last_line": lines[-1] if lines else "", "failed": [l for l in lines if l.startswith("FAILED")]}
        if rc != 0:
            out["error"] = f"pytest exited {rc}: {out['last_line']}"
        return out

    # ------------------------------------------------------------ losses at the head shape

    def losses(self) -> dict:
        from distill_dist import losses
        from distill_dist.losses import DenseTeacher, LossSpec, fused_linear_loss

        n, h, v = self.size["head_rows"], self.size["hidden"], 100352
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        g = torch.Generator().manual_seed(0)
        hs, ws = torch.randn(n, h, generator=g) * 0.5, torch.randn(v, h, generator=g) / h ** 0.5
        ht, wt = torch.randn(n, h, generator=g) * 0.5, torch.randn(v, h, generator=g) / h ** 0.5
        y = torch.randint(0, v, (n,), generator=g)
        dev = lambda t: t.to(self.device, dtype)  # noqa: E731
        uses = ["never"] + (["always"] if losses._liger_losses() is not None and self.device == "cuda" else [])
        out = {"shape": [n, h, v], "dtype": str(dtype).split(".")[-1]}
        for kind in ("kl", "ce"):
            spec = LossSpec(kind, temperature=2.0 if kind == "kl" else 1.0)
            res = {}
            for use in uses:
                losses.USE_LIGER = use
                times, value, grads = [], None, None
                for rep in range(3):
                    a, w = dev(hs).requires_grad_(True), dev(ws).requires_grad_(True)
                    teacher = DenseTeacher(dev(ht), dev(wt))
                    self._sync()
                    base = torch.cuda.memory_allocated() if self.device == "cuda" else 0
                    if self.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t0 = time.perf_counter()
                    loss = fused_linear_loss(a, w, spec, labels=y.to(self.device) if kind == "ce" else None,
                                             teacher=teacher, chunk_size=256)
                    loss.backward()
                    self._sync()
                    times.append(time.perf_counter() - t0)
                    value, grads = loss.item(), (a.grad.float().cpu(), w.grad.float().cpu())
                peak = torch.cuda.max_memory_allocated() - base if self.device == "cuda" else None
                res[use] = {"ms_median_of_3": round(1e3 * statistics.median(times), 2), "value": value,
                            "peak_above_inputs_gb": None if peak is None else round(peak / 1e9, 3), "_grads": grads}
            if "always" in res:
                ours, lig = res["never"], res["always"]
                lig["value_rel_diff"] = abs(lig["value"] - ours["value"]) / abs(ours["value"])
                for i, name in enumerate(("grad_hidden", "grad_head")):
                    a, b = lig["_grads"][i], ours["_grads"][i]
                    lig[f"{name}_rel_err"] = float((a - b).abs().max() / b.abs().max())
            for r in res.values():
                r.pop("_grads")
            out[kind] = {("liger" if k == "always" else "ours"): r for k, r in res.items()}
        losses.USE_LIGER = "cuda"
        if len(uses) == 1:
            out["liger"] = "not run: needs CUDA and liger-kernel"
        ours = out["kl"]["ours"]
        out["headline"] = {"step_s": ours["ms_median_of_3"] / 1e3, "tokens_per_s": round(n / (ours["ms_median_of_3"] / 1e3), 1),
                          "peak_gb": ours["peak_above_inputs_gb"]}
        return out

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    # ------------------------------------------------------------ the pipeline

    def inputs(self) -> dict:
        """The teacher (7B widths, random bf16), its tokenizer and the data, under work/."""
        from distill_dist.fileio import atomic_write_json
        from distill_dist.models import load_tokenizer

        w, sz = self.work, self.size
        tok_file = SHARED / "tokenizers" / "olmo2" / "tokenizer.json"
        csqa = SHARED / "commonsense_qa"
        if tok_file.is_file() and (csqa / "train_rand_split.jsonl").is_file():
            tok, data = load_tokenizer(str(tok_file)), self._csqa_subset(csqa)
            source = f"CSQA subset ({sz['train_rows']} train / {sz['dev_rows']} dev) + the OLMo2 tokenizer"
        else:
            from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa

            data = write_synthetic_csqa(w / "data", sz["train_rows"], sz["dev_rows"], 4, seed=0)
            tok, source = train_tokenizer(data), "synthetic task and its BPE (../shared/data absent)"
        vocab = -(-len(tok) // 128) * 128
        prune_7b.SHAPE.update(hidden=sz["hidden"], intermediate=sz["intermediate"], heads=sz["heads"], vocab=vocab)
        teacher = w / "teacher"
        nbytes = prune_7b.write_checkpoint(teacher, sz["layers"])
        cfg = json.loads((teacher / "config.json").read_text())
        atomic_write_json(teacher / "config.json", dict(cfg, eos_token_id=tok.eos_token_id,
                                                        pad_token_id=tok.pad_token_id or tok.eos_token_id))
        tok.save_pretrained(teacher)
        shape = ModelShape(hidden=sz["hidden"], intermediate=sz["intermediate"], layers=sz["layers"],
                           heads=sz["heads"], kv_heads=sz["heads"], vocab=vocab, qk_norm=True)
        atomic_json(w / "inputs.json", {"data": str(data), "teacher": str(teacher), "shape": asdict(shape)})
        return {"data": source, "teacher_gb": round(nbytes / 1e9, 2), "vocab": vocab,
                "teacher_params_b": round(shape.params() / 1e9, 3)}

    def _inputs(self) -> dict:
        return json.loads((self.work / "inputs.json").read_text())

    @property
    def teacher(self) -> Path:
        return Path(self._inputs()["teacher"])

    @property
    def data(self) -> Path:
        return Path(self._inputs()["data"])

    @property
    def shape(self) -> ModelShape:
        return ModelShape(**self._inputs()["shape"])

    def _csqa_subset(self, csqa: Path) -> Path:
        out = self.work / "csqa"
        out.mkdir(parents=True, exist_ok=True)
        for name, n in (("train_rand_split.jsonl", self.size["train_rows"]), ("dev_rand_split.jsonl", self.size["dev_rows"])):
            with open(csqa / name) as f:
                (out / name).write_text("".join(next(f) for _ in range(n)))
        (out / "test_rand_split_no_answers.jsonl").write_text("")
        return out

    def overrides(self) -> list[str]:
        w, sz, inputs = self.work, self.size, self._inputs()
        return [f"output_dir={w / 'runs'}", f"model.path={inputs['teacher']}", "model.dtype=bfloat16",
                f"data.path={inputs['data']}", "data.max_length=128", "prune.round_to=64", "prune.schedule=[0.5]",
                f"prune.output_dir={w / 'pruned'}", "prune.overwrite=true", f"teacher.cache_dir={w / 'cache'}",
                "teacher.batch_size=8", f"train.micro_batch_size={sz['micro']}", "train.grad_accum=2",
                f"train.max_steps={sz['steps']}", "train.warmup_steps=2", "train.save_every=10", "train.lr=1e-5",
                f"eval.limit={sz['dev_rows']}", "eval.batch_size=8"]

    def cli(self, args: list[str], ranks: int | None = None, wait: bool = True, log: str = "cli"):
        """The CLI as a user runs it; under torchrun (NCCL on a GPU, gloo on CPU) when ranks is given."""
        from distill_dist.runtime import free_port

        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port())] if ranks else [sys.executable]
        cmd = launcher + ["-m", "distill_dist.cli", *args]
        out = open(self.work / f"{log}.log", "w")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "2"})
        if not wait:
            return proc
        rc = proc.wait()
        if rc != 0:
            raise RuntimeError(f"{' '.join(args[:1])} exited {rc}: {(self.work / f'{log}.log').read_text()[-1500:]}")
        return rc

    def _timed_cli(self, args: list[str], ranks: int | None, log: str) -> dict:
        t0 = time.time()
        self.cli(args, ranks=ranks, log=log)
        peak = children_peak_rss_gb()
        return {"wall_s": round(time.time() - t0, 1), "host_peak_rss_gb": peak, "headline": {"peak_gb": peak}}

    def prune(self) -> dict:
        return self._timed_cli(["prune", *self.overrides()], None, "prune")

    def cache(self) -> dict:
        return self._timed_cli(["cache-teacher", *self.overrides(), "train.arm=kl"], 1, "cache")

    RUNS = {"kl_live": ["train.arm=kl", "teacher.source=live"],
            "kl_cache": ["train.arm=kl", "teacher.source=cache", "train.deterministic=true"],
            "ce": ["train.arm=ce"]}

    def _train(self, name: str) -> dict:
        t0 = time.time()
        self.cli(["train", *self.overrides(), *self.RUNS[name], f"train.output_dir={self.work / name}"], ranks=1, log=name)
        return {"wall_s": round(time.time() - t0, 1), **self.run_figures(self.work / name, name)}

    def kl_live(self) -> dict:
        return self._train("kl_live")

    def kl_cache(self) -> dict:
        return self._train("kl_cache")

    def ce(self) -> dict:
        return self._train("ce")

    def run_figures(self, run: Path, name: str) -> dict:
        """Throughput, MFU and peak memory of a finished run against plan.py's prediction at its shapes."""
        from distill_dist.checkpoint import read_metrics
        from distill_dist.config import load_config
        from distill_dist.hf_checkpoint import read_model_config

        m = read_metrics(run / "metrics.jsonl")
        steady = m[2:] or m
        tok_s = statistics.median(r["tokens_per_s"] for r in steady)
        meta = json.loads((run / "run_meta.json").read_text())
        cfg = load_config(None, self.overrides())
        s = ModelShape.from_config(read_model_config(self.work / "pruned"))
        L = cfg.data.max_length  # plan.py sizes activations for the longest row; the data's rows are shorter
        mean_len = statistics.mean(r["tokens_per_s"] * r["step_time_s"] for r in steady) / (
            cfg.train.micro_batch_size * cfg.train.grad_accum)
        live = name == "kl_live"
        flops_tok = (train_flops(s, mean_len, 1.0) + (forward_flops(self.shape, mean_len, 1.0) if live else 0)) / mean_len
        lengths = {"kl": {"max_tokens": L}}
        plan = per_gpu_memory(self.shape, s, cfg, lengths, Hardware(gpus_per_node=1, fused_adam=self.device == "cuda"),
                              DTYPE_BYTES["bfloat16"])
        placement = meta["teacher"].get("placement")
        predicted = {"kl_live": plan["total_live_replicated" if placement == "replicated" else "total_live"],
                     "kl_cache": plan["total_cache"], "ce": plan["total_cache"]}[name]
        peak = max(r["peak_memory_bytes"] for r in m)
        step_s = statistics.median(r["step_time_s"] for r in steady)
        return {"steps": len(m), "step_time_s_median": round(step_s, 4), "tokens_per_s_median": round(tok_s, 1),
                "headline": {"step_s": round(step_s, 4), "tokens_per_s": round(tok_s, 1), "peak_gb": round(peak / 1e9, 3)},
                "mean_row_tokens": round(mean_len, 1),
                "mfu": round(tok_s * flops_tok / (self.peak_tflops * 1e12), 4),
                "peak_memory_gb": round(peak / 1e9, 3), "plan_gb": round(predicted / 1e9, 3),
                "peak_is": "CUDA max allocated" if self.device == "cuda" else "VmHWM (with ~1 GB of imports)",
                "measured_over_plan": round(peak / predicted, 3), "teacher_placement": placement,
                "loss_first_last": [m[0]["loss"], m[-1]["loss"]],
                "eval_acc": json.loads((run / "eval" / "eval.json").read_text())["metrics"].get("acc")}

    # ------------------------------------------------------------ signal + resume

    def resume(self) -> dict:
        """The deterministic KL-cache run again, stopped by SIGUSR1 after a few steps and re-run."""
        from distill_dist.checkpoint import read_metrics

        run = self.work / "kl_cache_resumed"
        args = ["train", *self.overrides(), "train.arm=kl", "teacher.source=cache", "train.deterministic=true",
                "train.save_every=2", f"train.output_dir={run}"]
        proc = self.cli(args, ranks=1, wait=False, log="resume_1")
        deadline = time.time() + 300
        stop_after = max(1, self.size["steps"] // 4)
        while proc.poll() is None and time.time() < deadline and len(read_metrics(run / "metrics.jsonl")) < stop_after:
            time.sleep(0.05)
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            try:  # a child may exit while the tree is read
                if "distill_dist.cli" in " ".join(child.cmdline()):
                    child.send_signal(signal.SIGUSR1)
            except psutil.NoSuchProcess:
                continue
        rc1 = proc.wait()
        stopped_at = len(read_metrics(run / "metrics.jsonl"))
        self.cli(args, ranks=1, log="resume_2")
        a = [r["loss"] for r in read_metrics(self.work / "kl_cache" / "metrics.jsonl")]
        m = read_metrics(run / "metrics.jsonl")
        b = [r["loss"] for r in m]
        log = (self.work / "resume_1.log").read_text()
        step_s = statistics.median(r["step_time_s"] for r in m) if m else None
        out = {"first_exit": rc1, "checkpointed_stop": "exiting with 75" in log,  # torchrun itself exits 1
               "stopped_after_step": stopped_at, "steps": len(b),
               "headline": {"step_s": step_s, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in m) if m else None,
                           "peak_gb": round(max(r["peak_memory_bytes"] for r in m) / 1e9, 3) if m else None}}
        if len(a) != len(b):  # kl_cache did not run to the end: nothing to compare with
            return {**out, "bitwise_equal_to_uninterrupted": None, "note": f"kl_cache has {len(a)} steps"}
        return {**out, "bitwise_equal_to_uninterrupted": a == b,
                "max_abs_loss_diff": max((abs(x - y) for x, y in zip(a, b)), default=None)}

    # ------------------------------------------------------------ iterative

    def iterative(self) -> dict:
        from distill_dist.checkpoint import read_metrics

        run, pruned = self.work / "iterative", self.work / "pruned_iter"
        sched = ["prune.mode=iterative", "prune.schedule=[0.75,0.5,0.25]", f"prune.output_dir={pruned}"]
        over = [o for o in self.overrides() if not o.startswith(("prune.schedule", "prune.output_dir"))]
        self.cli(["prune", *over, *sched], log="iter_prune")
        self.cli(["train", *over, *sched, "train.arm=kl", f"train.max_steps={self.size['iter_steps']}",
                  "train.eval_after=false", f"train.output_dir={run}"], ranks=1, log="iterative")
        stages, steps = [], []
        for i in range(3):
            m = read_metrics(run / f"stage{i}" / "metrics.jsonl")
            steps += m
            stages.append({"first_step_memory_gb": round(m[0]["memory_bytes"] / 1e9, 3),
                           "peak_memory_gb": round(max(r["peak_memory_bytes"] for r in m) / 1e9, 3),
                           "checkpoints_left": (run / f"stage{i}" / "checkpoints").exists()})
        return {"stages": stages, "headline": {"step_s": statistics.median(r["step_time_s"] for r in steps),
                                              "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steps),
                                              "peak_gb": max(s["peak_memory_gb"] for s in stages)}}


# ------------------------------------------------------------ the driver

def run_section(args) -> int:
    """In the section's own process: do it, write its result (or its error) to work/results/NAME.json."""
    name = args.section
    if name in os.environ.get(FAIL_ENV, "").split(","):
        print(f"[gpu_check] {name}: failure injected ({FAIL_ENV}); exiting 3", flush=True)
        os._exit(3)
    check = Check(Path(args.work), Path(args.out_dir), SMOKE if args.smoke else FULL, args.peak_tflops)
    try:
        value = getattr(check, name)()
    except Exception as e:  # recorded, not raised: the driver goes on with the next section
        value = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
    results = Path(args.work) / "results"
    results.mkdir(exist_ok=True)
    atomic_json(results / f"{name}.json", value)
    return 0


def blocked_by(name: str, done: dict) -> list[str]:
    """The prerequisites of `name` that did not run or failed."""
    return [n for n in SECTIONS[name][0] if n not in done or "error" in done[n] or "skipped" in done[n]]


def spawn(name: str, args, timeout: float) -> dict:
    """One section in a process (and process group) of its own; what it wrote, or why it wrote nothing."""
    work = Path(args.work)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--work", str(work),
           "--out-dir", str(args.out_dir), "--peak-tflops", str(args.peak_tflops)] + (["--smoke"] if args.smoke else [])
    t0 = time.time()
    with open(Path(args.out_dir) / "sections.log", "a") as log:
        log.write(f"===== {name} (at most {timeout:.0f} s)\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its torchrun and CLI children too (they hold the GPU)
            proc.wait()
            rc = None
    path = work / "results" / f"{name}.json"
    value = json.loads(path.read_text()) if path.is_file() else {}
    if rc is None:
        value = {"error": f"timed out after {timeout:.0f} s (its share of the budget)", **value}
    elif rc != 0 and "error" not in value:
        value = {"error": f"section process exited {rc} before writing a result (see sections.log)", **value}
    value["seconds"] = round(time.time() - t0, 1)
    return value


def summary_lines(result: dict) -> list[str]:
    def cell(v, fmt):
        width = int(re.match(r"\d+", fmt).group())
        return "-".rjust(width) if v is None else format(v, fmt)

    lines = [f"{'section':<11} {'status':<8} {'s':>7} {'step_s':>9} {'tokens/s':>10} {'peak_GB':>8}"]
    for name, v in result["sections"].items():
        status = "skipped" if "skipped" in v else "error" if "error" in v else "ok"
        f = v.get("headline") or {}  # step time, tokens/s, peak memory: what the section measured of them
        lines.append(f"{name:<11} {status:<8} {cell(v.get('seconds'), '7.1f')} {cell(f.get('step_s'), '9.4f')} "
                     f"{cell(f.get('tokens_per_s'), '10.1f')} {cell(f.get('peak_gb'), '8.3f')}")
    return lines


def drive(args) -> int:
    out_dir, work = Path(args.out_dir), Path(args.work)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    (work / "results").mkdir(parents=True)
    wanted = [n for n in SECTIONS if n in args.sections.split(",")]
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"gpu_check: unknown section(s) {sorted(unknown)}; known: {list(SECTIONS)}")
    out = out_dir / "gpu_check.json"
    t_start = time.time()
    deadline = t_start + args.budget_s
    result = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "smoke": args.smoke,
              "budget_s": args.budget_s, "install": {"seconds": args.install_s, "rc": args.install_rc},
              "sections": {}}
    print(f"[gpu_check] budget {args.budget_s:.0f} s for {len(wanted)} sections ({', '.join(wanted)}); each result "
          f"goes to {out} as it ends", flush=True)
    for name in wanted:
        left = deadline - time.time()
        missing = blocked_by(name, result["sections"])
        if missing:
            value = {"skipped": f"needs {', '.join(missing)}, which did not run or failed"}
        elif left < 5:
            value = {"skipped": f"out of budget ({args.budget_s:.0f} s)"}
        else:
            timeout = left if args.smoke else min(SECTIONS[name][1], left)
            print(f"[gpu_check] {name} (at most {timeout:.0f} s) ...", flush=True)
            value = spawn(name, args, timeout)
        result["sections"][name] = value
        atomic_json(out, result)
        print(f"[gpu_check] {name}: {json.dumps({k: v for k, v in value.items() if k != 'traceback'})[:600]}",
              flush=True)
    result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    result["seconds"] = round(time.time() - t_start, 1)
    atomic_json(out, result)
    errors = [k for k, v in result["sections"].items() if "error" in v or "skipped" in v]
    print("\n".join(summary_lines(result)))
    print(f"[gpu_check] {result['seconds']:.0f} s of the {args.budget_s:.0f} s budget; wrote {out}; "
          f"sections with errors or skipped: {errors or 'none'}", flush=True)
    return 1 if errors else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default="gpu_check_out", help="a folder: gpu_check.json, pytest.log, sections.log")
    ap.add_argument("--work", default="/tmp/dd_gpu_check")
    ap.add_argument("--smoke", action="store_true", help="toy sizes (CI on CPU)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H100/H200: 989)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=510.0, help="all sections together, in seconds")
    ap.add_argument("--install-s", type=float, default=None, help="the wheel install's seconds (gpu_check.sh)")
    ap.add_argument("--install-rc", type=int, default=None, help="the wheel install's exit status (gpu_check.sh)")
    ap.add_argument("--section", help=argparse.SUPPRESS)  # internal: run this one section in this process
    args = ap.parse_args(argv)
    return run_section(args) if args.section else drive(args)


if __name__ == "__main__":
    sys.exit(main())
