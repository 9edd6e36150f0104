"""The GPU check's parts that need no GPU (CI): its wheel list covers what the project imports, and it runs
the way the device machine runs it -- gpu_check.sh, an OUT folder, wheels installed with pip --target --
on CPU at toy sizes, each section in its own process, so that one failing section loses nothing else."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[ ;<>=!~\[(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _wheel_list() -> tuple[dict, set, set]:
    """{shipped name: pinned version}, the preinstalled names, the names not shipped."""
    shipped, pre, skipped = {}, set(), set()
    for line in (REPO / "bench" / "gpu_wheels.txt").read_text().splitlines():
        if line.startswith("# preinstalled:"):
            pre = {_name(n) for n in line.split(":", 1)[1].split()}
        elif line.startswith("# not shipped:"):
            skipped = {_name(n) for n in line.split(":", 1)[1].split("(")[0].split()}
        elif line.strip() and not line.startswith("#"):
            shipped[_name(line)] = line.split("#")[0].split("==")[1].strip()
    return shipped, pre, skipped


def test_wheel_list_covers_the_projects_dependencies_and_their_closure():
    """Every dependency in pyproject (and the liger extra) is shipped, preinstalled on the node, or named
    as not shipped; every shipped package's own requirements are too (read from the installed package's
    metadata where this machine has the very version shipped: 20 of 23 here)."""
    shipped, pre, skipped = _wheel_list()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["liger"]}
    assert wanted - set(shipped) - pre - skipped == set()
    assert {"deepspeed", "omegaconf", "hjson", "datasets", "liger-kernel", "pytest"} <= set(shipped)
    missing = {}
    checked = 0
    for pkg, version in shipped.items():
        try:
            if md.version(pkg) != version:
                continue  # another version here (pytest, pyarrow, deepspeed builds): its requirements may differ
            reqs = md.requires(pkg) or []
        except md.PackageNotFoundError:
            continue  # not installed here (liger-kernel): its wheel's requirements are torch and triton
        checked += 1
        for r in reqs:
            if "extra ==" in r or re.search(r'sys_platform == "(win32|emscripten)"|platform_system == "Windows"|'
                                            r'python_version < "3\.1[01]"', r):
                continue
            if _name(r) not in set(shipped) | pre:
                missing.setdefault(pkg, []).append(r)
    assert missing == {} and checked >= 15, (missing, checked)


def test_wheels_script_reads_the_list():
    script = (REPO / "bench" / "gpu_wheels.sh").read_text()
    assert "gpu_wheels.txt" in script and "DS_BUILD_OPS=0" in script and "--only-binary=:all:" in script
    check = (REPO / "bench" / "gpu_check.sh").read_text()
    assert "--no-index --no-deps --no-compile --target" in check and "PYTEST_DISABLE_PLUGIN_AUTOLOAD=1" in check


def _probe_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, standing in for the shipped ones (which this machine has installed already
    and CI cannot download): proves the install into --target and that the sections import from there."""
    folder.mkdir()
    path = folder / "dd_gpu_check_probe-0.1-py3-none-any.whl"
    files = {"dd_gpu_check_probe/__init__.py": "VERSION = '0.1'\n",
             "dd_gpu_check_probe-0.1.dist-info/METADATA": "Metadata-Version: 2.1\nName: dd-gpu-check-probe\nVersion: 0.1\n",
             "dd_gpu_check_probe-0.1.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                      "Tag: py3-none-any\n"}
    files["dd_gpu_check_probe-0.1.dist-info/RECORD"] = "".join(f"{n},,\n" for n in [*files, "dd_gpu_check_probe-0.1.dist-info/RECORD"])
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def _run_check(tmp_path: Path, sections: str, fail: str = "", wheels: bool = True) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out" / "device"  # does not exist yet: the script makes it
    env = {**os.environ, "OUT": str(out), "SITE": str(tmp_path / "site"), "PYTHON": sys.executable, "BUDGET_S": "1500",
           "WHEELS": str(tmp_path / "wheels") if wheels else "none", "DD_GPU_CHECK_FAIL": fail,
           "PYTHONPATH": str(REPO / "src")}
    if wheels:
        _probe_wheel(tmp_path / "wheels")
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--smoke", "--work", str(tmp_path / "work"),
                           "--sections", sections], env=env, capture_output=True, text=True, timeout=1500)
    return proc, out


def test_check_runs_as_on_the_device_and_a_failing_section_loses_nothing_else(tmp_path):
    """OUT a folder, the wheels installed with pip --target, `losses` dying at start (DD_GPU_CHECK_FAIL): the
    sections before and after it all run and report, each result is in OUT/gpu_check.json, and the summary
    names every section."""
    proc, out = _run_check(tmp_path, "env,pytest_gpu,losses,inputs,prune", fail="losses")
    result = json.loads((out / "gpu_check.json").read_text())
    sections = result["sections"]
    assert list(sections) == ["env", "pytest_gpu", "losses", "inputs", "prune"], (proc.stdout[-3000:], proc.stderr[-3000:])
    assert sections["losses"]["error"].startswith("section process exited 3 before writing a result")
    errors = {k: v.get("error") for k, v in sections.items() if k != "losses" and "error" in v}
    assert errors == {}, (errors, proc.stdout[-3000:])
    assert proc.returncode == 1 and result["install"]["rc"] == 0 and result["budget_s"] > 0
    site = sections["env"]["site"]
    assert site["installed"] == {"dd-gpu-check-probe": "0.1"} and site["all_resolved_there"] is True
    assert sections["pytest_gpu"]["rc"] == 0 and "skipped" in sections["pytest_gpu"]["last_line"]  # no CUDA here
    assert "test_gpu.py" in (out / "pytest.log").read_text()
    assert sections["prune"]["wall_s"] > 0 and sections["prune"]["host_peak_rss_gb"] > 0.1
    assert (tmp_path / "work" / "pruned" / "pruning_plan.json").is_file()
    assert "failure injected" in (out / "sections.log").read_text()
    # Each section process wrote its own result file, which the driver merged; the crashed one wrote none.
    written = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "work" / "results").glob("*.json")}
    assert set(written) == set(sections) - {"losses"}
    assert all(written[n].items() <= sections[n].items() for n in written)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "install.log", "pytest.log", "sections.log"]
    summary = proc.stdout[proc.stdout.index("section     status"):]
    assert all(re.search(rf"^{n} +(ok|error) ", summary, re.M) for n in sections), summary
    assert re.search(r"^losses +error ", summary, re.M)
    assert re.search(r"^\[gpu_check\] \d+ s of the \d+ s budget; wrote ", proc.stdout, re.M), proc.stdout[-2000:]
    assert "budget 1500 s in all" in proc.stdout and f"results in {out}/gpu_check.json" in proc.stdout


def test_a_section_whose_prerequisite_failed_is_skipped_by_name():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    done = {"inputs": {"seconds": 1.0}, "prune": {"error": "boom"}}
    assert gpu_check.blocked_by("prune", done) == []
    assert gpu_check.blocked_by("kl_live", done) == ["prune"] and gpu_check.blocked_by("cache", done) == ["prune"]
    assert gpu_check.blocked_by("kl_cache", done) == ["cache"]  # never ran
    assert gpu_check.blocked_by("iterative", done) == [] and gpu_check.blocked_by("env", {}) == []


@pytest.mark.multirank
def test_every_section_at_toy_sizes_on_cpu(tmp_path):
    """The whole check, every section (minutes on 2 cores): figures for every run, the resumed run bitwise equal."""
    proc, out = _run_check(tmp_path, ",".join(["env", "pytest_gpu", "losses", "inputs", "prune", "cache", "kl_live",
                                                "kl_cache", "ce", "resume", "iterative"]), wheels=False)
    result = json.loads((out / "gpu_check.json").read_text())
    sections = result["sections"]
    errors = {k: v.get("error") or v.get("skipped") for k, v in sections.items() if "error" in v or "skipped" in v}
    assert proc.returncode == 0 and errors == {}, (errors, proc.stdout[-3000:], proc.stderr[-3000:])
    assert sections["env"]["site"] is None and result["install"]["rc"] == 0
    for run in ("kl_live", "kl_cache", "ce"):
        fig = sections[run]
        assert fig["steps"] == 3 and fig["tokens_per_s_median"] > 0 and fig["plan_gb"] > 0
        assert fig["headline"]["step_s"] > 0 and fig["headline"]["peak_gb"] > 0
    assert sections["resume"]["checkpointed_stop"] is True and sections["resume"]["steps"] == 3
    assert sections["resume"]["bitwise_equal_to_uninterrupted"] is True  # CPU: exact
    assert [s["checkpoints_left"] for s in sections["iterative"]["stages"]] == [False] * 3
