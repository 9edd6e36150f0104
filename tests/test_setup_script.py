"""setup.sh's torch install: TORCH_INDEX_URL reaches pip as --index-url; unset, the command is pip's plain install.

The real download needs the internet; here pip resolves torch from a local file:// index with --dry-run.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

SETUP = Path(__file__).resolve().parents[1] / "setup.sh"


def install_torch_argv(pip: list[str], **env: str) -> subprocess.CompletedProcess:
    """setup.sh sourced (its function only, nothing installed), then `install_torch PIP...`; no TORCH_* or
    PIP_* settings from this machine's environment."""
    script = 'source "$0"; install_torch "$@"'
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("TORCH_SPEC", "TORCH_INDEX_URL", "PIP_"))}
    return subprocess.run(["bash", "-c", script, str(SETUP), *pip], env={**clean, **env}, capture_output=True,
                          text=True, timeout=300)


def test_the_index_url_reaches_pip_and_the_default_is_unchanged():
    printed = lambda **env: install_torch_argv(["printf", "%s\\n"], **env).stdout.splitlines()  # noqa: E731
    assert printed() == ["install", "-q", "torch==2.13.0"]  # `pip install -q "$TORCH_SPEC"`, as always
    assert printed(TORCH_INDEX_URL="") == ["install", "-q", "torch==2.13.0"]
    url = "https://download.pytorch.org/whl/cpu"
    assert printed(TORCH_INDEX_URL=url) == ["install", "-q", "torch==2.13.0", "--index-url", url]
    assert printed(TORCH_INDEX_URL=url, TORCH_SPEC="torch==2.9.1") == ["install", "-q", "torch==2.9.1",
                                                                       "--index-url", url]
    assert printed(TORCH_SPEC="skip", TORCH_INDEX_URL=url) == []


def test_real_pip_resolves_torch_from_the_given_index(tmp_path):
    """A PEP 503 index on disk holding one stand-in torch wheel: pip (no config files, no PIP_* settings) finds
    it only through --index-url. --dry-run installs nothing, and --target would keep even a real install out of
    this environment; pip's --report says what it resolved, from where."""
    index = tmp_path / "index"
    wheel = index / "torch-0.0.1-py3-none-any.whl"
    (index / "simple" / "torch").mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        info = "torch-0.0.1.dist-info"
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: torch\nVersion: 0.0.1\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    (index / "simple" / "torch" / "index.html").write_text(f'<a href="../../{wheel.name}">{wheel.name}</a>\n')
    report = tmp_path / "report.json"
    env = {"PIP_CONFIG_FILE": os.devnull, "PIP_DRY_RUN": "1", "PIP_TARGET": str(tmp_path / "target"),
           "PIP_REPORT": str(report), "PIP_NO_CACHE_DIR": "1", "TORCH_SPEC": "torch==0.0.1",
           "TORCH_INDEX_URL": (index / "simple").as_uri()}
    r = install_torch_argv([sys.executable, "-m", "pip"], **env)
    assert r.returncode == 0, r.stderr
    resolved = [(i["metadata"]["name"], i["metadata"]["version"], i["download_info"]["url"])
                for i in json.loads(report.read_text())["install"]]
    assert resolved == [("torch", "0.0.1", wheel.as_uri())]
    assert not (tmp_path / "target").exists()
