"""pyproject's transformers bound covers what the code needs: `from_pretrained(dtype=...)` (transformers
>= 4.56, huggingface/transformers#39782); older versions drop the keyword and silently load float32."""
from __future__ import annotations

import tomllib
from pathlib import Path

import torch
import transformers
from packaging.requirements import Requirement
from packaging.version import Version

from conftest import REPO_ROOT

NEEDS = Version("4.56")


def _transformers_requirement() -> Requirement:
    deps = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in deps if Requirement(d).name == "transformers")


def test_lower_bound_admits_no_version_without_dtype_keyword():
    spec = _transformers_requirement().specifier
    assert not spec.contains("4.55.4") and spec.contains(str(NEEDS))
    assert spec.contains(transformers.__version__), f"installed {transformers.__version__} is outside {spec}"


def test_dtype_keyword_is_honoured(tmp_path):
    """What the bound protects: a float32 checkpoint loaded with dtype=bfloat16 comes back in bfloat16."""
    config = transformers.Olmo2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, eos_token_id=0, pad_token_id=0)
    transformers.Olmo2ForCausalLM(config).save_pretrained(tmp_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def _image_versions() -> dict[str, str]:
    """The GPU node's versions, as bench/gpu_wheels.txt names them (`# image: python 3.12 torch 2.11 ...`)."""
    line = next(l for l in (REPO_ROOT / "bench" / "gpu_wheels.txt").read_text().splitlines() if l.startswith("# image:"))
    words = line.split(":", 1)[1].split("(")[0].split()
    return dict(zip(words[::2], words[1::2]))


def test_bounds_admit_the_gpu_images_versions():
    """No CPU build of torch 2.11 for Python 3.12 is on the registries this project can reach (PyPI's 2.11
    wheels are CUDA builds), so the image's versions cannot all run here; the declared bounds must admit them."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    image = _image_versions()
    assert set(image) == {"python", "torch", "transformers"}
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet(project["requires-python"]).contains(image["python"] + ".0")
    deps = {Requirement(d).name: Requirement(d).specifier for d in project["dependencies"]}
    for name in ("torch", "transformers"):
        assert deps[name].contains(image[name] + ".0"), f"pyproject's {name}{deps[name]} excludes the image's {image[name]}"


def _python(version: str) -> str | None:
    """An interpreter of `version` on PATH or installed by pyenv (whose shim fails unless it is selected)."""
    import os
    import shutil
    import subprocess

    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [shutil.which(f"python{version}"), *map(str, sorted(pyenv.glob(f"versions/{version}.*/bin/python{version}")))]
    for exe in filter(None, candidates):
        if subprocess.run([exe, "-c", f"import sys; assert sys.version.startswith('{version}.')"],
                          capture_output=True).returncode == 0:
            return exe
    return None


def test_every_source_file_compiles_under_the_images_python():
    """The image runs Python 3.12: every module, benchmark and test compiles there, with SyntaxWarnings
    (invalid escapes, which 3.12 started to warn about) as errors."""
    import subprocess

    version = _image_versions()["python"]
    exe = _python(version)
    if exe is None:
        import pytest

        pytest.skip(f"no python{version} on this machine")
    files = [str(p) for d in ("src", "bench", "tests") for p in sorted((REPO_ROOT / d).rglob("*.py"))]
    code = ("import sys, warnings; warnings.simplefilter('error')\n"
            "for f in sys.argv[1:]:\n    compile(open(f).read(), f, 'exec')\nprint(len(sys.argv) - 1)")
    proc = subprocess.run([exe, "-c", code, *files], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == str(len(files)), proc.stderr[-2000:]
