"""pyproject's transformers bound covers what the code needs: `from_pretrained(dtype=...)` (transformers
>= 4.56, huggingface/transformers#39782); older versions drop the keyword and silently load float32."""
from __future__ import annotations

import tomllib

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
