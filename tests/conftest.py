"""Shared fixtures: the real reference data beside the repo (or a skip), and small synthetic stand-ins.

Everything the tests write goes under pytest's tmp dirs; the reference data is only ever read.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# ../shared/data beside the repository root (never copied into the project).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Keep the 2-core machine responsive and runs reproducible.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# The files that take minutes (Slurm clusters, the demo, the GPU check's sections), slowest first: under the
# README's `-n 2 --dist loadfile` they start at once on the two workers while the short files fill the gaps
# (much of a Slurm test is waiting: daemons starting, requeue delays), instead of one of them coming last.
SLOWEST_FIRST = ("test_slurm_multinode.py", "test_demo.py", "test_gpu_check.py", "test_slurm.py",
                 "test_resilience.py", "test_edge.py", "test_train.py", "test_runtime.py")


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: keep the order below, not by test count
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's tests stay together


def shared_path(*parts: str) -> Path:
    """A path under the shared reference data, or a clean skip naming what is missing."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"reference data not available: {p} is missing")
    return p


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not available: {SHARED_DATA} is missing")
    return SHARED_DATA


@pytest.fixture(scope="session")
def csqa_dir(shared_data) -> Path:
    return shared_path("commonsense_qa", "dev_rand_split.jsonl").parent


@pytest.fixture(scope="session")
def olmo2_tokenizer_file(shared_data) -> Path:
    return shared_path("tokenizers", "olmo2", "tokenizer.json")


@pytest.fixture(scope="session")
def olmo2_tokenizer(olmo2_tokenizer_file):
    from distill_dist.models import load_tokenizer

    return load_tokenizer(str(olmo2_tokenizer_file))


@pytest.fixture(scope="session")
def tinystories_dir(shared_data) -> Path:
    return shared_path("models", "TinyStories-656K", "model.safetensors").parent


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory) -> Path:
    """Synthetic CSQA in the official jsonl layout: 200 train / 40 dev / 20 test (no answers) rows."""
    from distill_dist.synthetic import write_synthetic_csqa

    return write_synthetic_csqa(tmp_path_factory.mktemp("synthetic_csqa"), n_train=200, n_dev=40, n_test=20, seed=0)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE (512 tokens) trained on its own synthetic CSQA files."""
    from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa

    data = write_synthetic_csqa(tmp_path_factory.mktemp("tok_data"), n_train=200, n_dev=40, n_test=20, seed=0)
    return train_tokenizer(data)


TINY_HIDDEN, TINY_INTER, TINY_LAYERS = 64, 192, 2


def randomize_(model, seed: int = 0, std: float = 0.15) -> None:
    """Redraw every weight so that each MLP neuron matters.

    The default init (std 0.02) makes MLP outputs ~1e-4 of the logits, so a 1e-5 equivalence check
    could not tell the right neurons from the wrong ones. Matrices get N(0, std^2), norm weights
    1 + N(0, 0.2^2) (so copying them wrong would show too).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            else:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))


def make_tiny_model(tokenizer, architecture: str = "olmo2", seed: int = 0, hidden: int = TINY_HIDDEN,
                    inter: int = TINY_INTER, layers: int = TINY_LAYERS, heads: int = 4):
    from distill_dist.config import TinyModelConfig
    from distill_dist.models import build_tiny_model

    cfg = TinyModelConfig(architecture=architecture, hidden_size=hidden, intermediate_size=inter,
                          num_layers=layers, num_heads=heads, num_kv_heads=heads, seed=seed)
    model = build_tiny_model(cfg, tokenizer)
    randomize_(model, seed)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_olmo2_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A random tiny OLMo2 (hidden 64, MLP 192, 2 layers, vocab 512) + tokenizer, saved in 100 KB shards.

    Session-scoped and shared: tests only read it (prune writes elsewhere).
    """
    out = tmp_path_factory.mktemp("tiny_olmo2")
    model = make_tiny_model(tiny_tokenizer)
    model.save_pretrained(out, max_shard_size="100KB")
    tiny_tokenizer.save_pretrained(out)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2 and (out / "model.safetensors.index.json").is_file(), "fixture must be multi-shard"
    return out


def rank_processes(pid: int) -> list:
    """The training ranks below process `pid`: each `python [options] -m distill_dist.cli`, not torchrun's agent
    (`python -m torch.distributed.run ...` or `python -c ...`, which names the module later in its command line).
    A process that exits while the tree is read (a launcher's short-lived helper) is skipped, not raised: the
    tree is a snapshot of processes that come and go."""
    import psutil

    ranks = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            argv = child.cmdline()
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        program = next((i for i, arg in enumerate(argv[1:], 1) if arg in ("-c", "-m")), None)  # ends the options
        if program is not None and argv[program:program + 2] == ["-m", "distill_dist.cli"]:
            ranks.append(child)
    return ranks


@pytest.fixture()
def free_port() -> int:
    from distill_dist.runtime import free_port as pick

    return pick()


def make_teacher_and_student(root: Path, n_train: int, n_dev: int, data_seed: int, model_seed: int,
                             teacher_steps: int, keep: float = 0.25):
    """Synthetic data, a tokenizer, a briefly trained tiny OLMo2 teacher (its distribution is far from
    uniform, so pruning moves it) and its pruned student, under root/{data,teacher,pruned}."""
    from distill_dist.config import TinyModelConfig, load_config
    from distill_dist.demo import train_teacher
    from distill_dist.models import build_tiny_model
    from distill_dist.prune import prune_checkpoint
    from distill_dist.synthetic import train_tokenizer, write_synthetic_csqa

    data = write_synthetic_csqa(root / "data", n_train=n_train, n_dev=n_dev, n_test=4, seed=data_seed)
    tok = train_tokenizer(data)
    teacher = build_tiny_model(TinyModelConfig(hidden_size=32, intermediate_size=128, num_heads=2, num_kv_heads=2,
                                               seed=model_seed), tok)
    train_teacher(teacher, tok, load_config(None, [f"data.path={data}", "data.max_length=64",
                                                   f"demo.teacher_steps={teacher_steps}"]))
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    prune_checkpoint(root / "teacher", root / "pruned", keep, log=lambda *a: None)
    return data, tok


@pytest.fixture(scope="session")
def refusal_env(tmp_path_factory):
    """A small teacher, its pruned student and synthetic data, with the base overrides of a 2-step run:
    what the refusal tests (test_runtime.py, test_bad_inputs.py) start from. Read only."""
    root = tmp_path_factory.mktemp("refusals")
    data, tok = make_teacher_and_student(root, n_train=80, n_dev=16, data_seed=7, model_seed=4, teacher_steps=40)
    base = [f"model.path={root / 'teacher'}", f"train.student={root / 'pruned'}", f"data.path={data}",
            "data.max_length=64", "train.micro_batch_size=2", "train.warmup_steps=0", "train.save_every=1",
            "train.max_steps=2", "train.eval_after=false", "train.pg_timeout_minutes=5",
            "train.ds_overrides={zero_optimization.stage3_param_persistence_threshold: 0}"]
    return {"root": root, "data": data, "base": base, "tok": tok}


def as_ranks(args: list[str], world: int = 2, timeout: float = 240, command: str = "train", stop_when=None):
    """Run `distill-dist COMMAND ARGS` as `world` rank processes; (exit codes, stderr lines per rank, seconds).
    stop_when: polled; once true every rank gets SIGUSR1 (the preemption notice: checkpoint, exit 75)."""
    from distill_dist.runtime import free_port as pick_port

    port, t0 = pick_port(), time.time()
    procs = [subprocess.Popen([sys.executable, "-m", "distill_dist.cli", command, *args],
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r),
                                   "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    if stop_when is not None:
        while time.time() < t0 + timeout and all(p.poll() is None for p in procs) and not stop_when():
            time.sleep(0.05)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGUSR1)
    outs = [p.communicate(timeout=timeout) for p in procs]
    return [p.returncode for p in procs], [err.splitlines() for _, err in outs], time.time() - t0


def assert_same_refusal(codes, errs, seconds, expected: str):
    lines = [[l for l in e if l.startswith("distill-dist")] for e in errs]
    assert codes == [2, 2], (codes, errs)
    assert all(len(ls) == 1 for ls in lines), lines
    assert lines[0] == lines[1] and expected in lines[0][0], lines
    assert not any("Traceback" in l for e in errs for l in e), errs
    # Decided before any engine exists; far below the 5-minute process-group timeout a hang would take.
    assert seconds < 150, seconds


@pytest.fixture(scope="session")
def slurm_models(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny teacher, its pruned student and the synthetic data every Slurm test trains on (tests/test_slurm*.py),
    built once per session: (directory holding teacher/ and pruned/, data path). Read only."""
    root = tmp_path_factory.mktemp("slurm_models")
    data, _ = make_teacher_and_student(root, n_train=160, n_dev=24, data_seed=5, model_seed=3, teacher_steps=100)
    return root, data
