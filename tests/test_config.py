"""Config loading: every bad input is one ConfigError (or one CLI error line) that names the field."""
from __future__ import annotations

import dataclasses

import pytest

from distill_dist import cli
from distill_dist.config import RunConfig, load_config
from distill_dist.errors import ConfigError

TOP_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(RunConfig)))
PRUNE_KEYS = ("calibration, calibration_batch_size, calibration_samples, max_shard_mb, mode, output_dir, overwrite, "
              "round_to, schedule, score")


def _yaml(tmp_path, text: str):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---------------------------------------------------------------- unknown keys

@pytest.mark.parametrize("via", ["yaml", "override"])
def test_unknown_top_level_key(tmp_path, via):
    if via == "yaml":
        args = (_yaml(tmp_path, "output_dir: x\nouptut_dir: y\n"), [])
    else:
        args = (None, ["ouptut_dir=y"])
    with pytest.raises(ConfigError) as e:
        load_config(*args)
    msg = str(e.value)
    assert "'ouptut_dir'" in msg
    assert f"valid keys here: {TOP_KEYS}" in msg


@pytest.mark.parametrize("via", ["yaml", "override"])
def test_unknown_nested_key(tmp_path, via):
    if via == "yaml":
        args = (_yaml(tmp_path, "prune:\n  schedule: [0.5]\n  keep_ratio: 0.5\n"), [])
    else:
        args = (None, ["prune.keep_ratio=0.5"])
    with pytest.raises(ConfigError) as e:
        load_config(*args)
    msg = str(e.value)
    assert "'prune.keep_ratio'" in msg
    assert f"valid keys here: {PRUNE_KEYS}" in msg


def test_unknown_key_in_yaml_is_caught_even_when_override_is_valid(tmp_path):
    with pytest.raises(ConfigError, match=r"'eval\.bach_size'"):
        load_config(_yaml(tmp_path, "eval:\n  bach_size: 4\n"), ["eval.batch_size=8"])


def test_section_given_a_scalar_is_refused():
    with pytest.raises(ConfigError, match=r"'tiny' must be a mapping"):
        load_config(None, ["tiny=3"])


# ---------------------------------------------------------------- ranges

@pytest.mark.parametrize("schedule, index, value", [
    ("[0]", 0, "0.0"), ("[1.5]", 0, "1.5"), ("[-0.25]", 0, "-0.25"), ("[0.5,-0.1]", 1, "-0.1"),
])
def test_keep_ratio_out_of_range(schedule, index, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"prune.schedule={schedule}"])
    msg = str(e.value)
    assert f"'prune.schedule[{index}]' = {value}" in msg
    assert "(0, 1]" in msg


def test_keep_ratio_from_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match=r"'prune\.schedule\[0\]' = 1\.5"):
        load_config(_yaml(tmp_path, "prune:\n  schedule: [1.5]\n"))


def test_keep_ratio_boundary_one_is_allowed():
    assert load_config(None, ["prune.schedule=[1.0]"]).prune.keep_ratio == 1.0


def test_schedule_must_decrease():
    with pytest.raises(ConfigError, match=r"'prune\.schedule' = \[0\.5, 0\.6\]: expected strictly decreasing"):
        load_config(None, ["prune.schedule=[0.5,0.6]"])


@pytest.mark.parametrize("override, field", [
    ("tiny.hidden_size=-1", "tiny.hidden_size"),
    ("data.max_length=0", "data.max_length"),
    ("eval.batch_size=0", "eval.batch_size"),
    ("tiny.num_layers=-3", "tiny.num_layers"),
    ("data.train_examples=0", "data.train_examples"),
    ("eval.limit=-5", "eval.limit"),
])
def test_non_positive_sizes(override, field):
    value = override.split("=")[1]
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"config field '{field}' = {value}" in str(e.value)


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"'prune\.score' = 'l1'.*gate_up_down"):
        load_config(None, ["prune.score=l1"])


# ---------------------------------------------------------------- files, types, syntax

def test_missing_config_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="config file not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_yaml_syntax_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(_yaml(tmp_path, "prune:\n  schedule: [0.5\n"))


def test_type_error_names_field():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.seed=abc"])
    msg = str(e.value)
    assert "'data.seed'" in msg and "abc" in msg


@pytest.mark.parametrize("bad", ["prune.schedule", "=0.5"])
def test_override_without_key_value(bad):
    with pytest.raises(ConfigError, match=r"is not of the form key=value"):
        load_config(None, [bad])


def test_unparsable_override_value_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot parse overrides"):
        load_config(None, ["prune.schedule=[0.5"])


def test_cli_positional_argument_is_refused(capsys):
    assert cli.main(["prune", "prune.schedule"]) == 2
    lines = _error_lines(capsys)
    assert lines == ["distill-dist: error: unexpected argument 'prune.schedule': overrides are key=value"]


# ---------------------------------------------------------------- interpolation and defaults

def test_interpolation_resolves(tmp_path):
    cfg = load_config(_yaml(tmp_path, "output_dir: /runs/exp1\n"), [])
    assert cfg.prune.output_dir == "/runs/exp1/pruned"
    assert cfg.report.output_dir == "/runs/exp1/report"
    cfg = load_config(None, ["output_dir=/a/b", "train.arm=ce"])
    assert cfg.train.output_dir == "/a/b/ce"


def test_override_beats_yaml(tmp_path):
    cfg = load_config(_yaml(tmp_path, "eval:\n  batch_size: 4\nprune:\n  schedule: [0.5]\n"),
                      ["eval.batch_size=9", "prune.schedule=[0.25]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.eval.batch_size == 9 and cfg.prune.schedule == [0.25]


def test_bad_interpolation_names_field():
    with pytest.raises(ConfigError, match=r"'prune\.output_dir'.*nope"):
        load_config(None, ["prune.output_dir=${nope}/x"])


# ---------------------------------------------------------------- the CLI's one error line

def test_cli_missing_model_dir_is_one_error_line(tmp_path, capsys):
    missing = tmp_path / "no_such_checkpoint"
    code = cli.main(["prune", f"model.path={missing}", f"prune.output_dir={tmp_path / 'out'}"])
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith("distill-dist: error:")
    assert "'model.path'" in lines[0] and str(missing) in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_bad_keep_ratio_is_one_error_line(tmp_path, capsys):
    code = cli.main(["prune", f"model.path={tmp_path}", "prune.schedule=[1.5]"])
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("distill-dist: error:")
    assert "prune.schedule[0]" in lines[0]


def test_cli_one_shot_refuses_two_ratios(tiny_olmo2_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    code = cli.main(["prune", f"model.path={tiny_olmo2_dir}", "prune.schedule=[0.5,0.25]",
                     f"prune.output_dir={out}"])
    assert code == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("distill-dist: error:")
    assert "'prune.schedule'" in lines[0] and "one_shot" in lines[0]
    assert not out.exists()


def test_cli_config_file_missing(tmp_path, capsys):
    assert cli.main(["eval", "--config", str(tmp_path / "missing.yaml")]) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "config file not found" in lines[0]


def test_deepspeed_launcher_local_rank_argument_is_accepted(monkeypatch, capsys):
    """`deepspeed --module distill_dist.cli ...` appends --local_rank=N; it must not be a parse error."""
    monkeypatch.setenv("LOCAL_RANK", "0")  # restored after the test
    assert cli.main(["--local_rank=1", "prune", "model.path=/no/such/dir"]) == 2
    assert "model.path" in capsys.readouterr().err  # got past argument parsing to the config check
    import os
    assert os.environ["LOCAL_RANK"] == "1"


@pytest.mark.parametrize("text, kind", [("just a string\n", "str"), ("- a\n- b\n", "list"), ("42\n", "int")])
def test_config_file_that_is_not_a_mapping(tmp_path, text, kind):
    with pytest.raises(ConfigError, match=f"must be a mapping at the top level .*not a {kind}$"):
        load_config(_yaml(tmp_path, text))


def test_cross_field_checks_fail_at_load():
    """Decided from the config alone, before any process group or model (cli turns it into one line)."""
    with pytest.raises(ConfigError, match=r"'teacher.source' = 'cache': a teacher-logit cache supports train.loss=kl "
                                          r"only, not 'jsd'"):
        load_config(None, ["teacher.source=cache", "train.loss=jsd"])
    with pytest.raises(ConfigError, match=r"'prune.schedule' = \[0.5, 0.25\]: expected one keep ratio for "
                                          r"prune.mode=one_shot"):
        load_config(None, ["prune.schedule=[0.5,0.25]"])
    assert load_config(None, ["prune.schedule=[0.5,0.25]", "prune.mode=iterative"]).prune.keep_ratio == 0.25


def test_float16_training_is_refused_before_any_process_group(capsys):
    assert cli.main(["train", "model.dtype=float16", "train.student=/nonexistent"]) == 2
    lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("distill-dist")]
    assert lines == ["distill-dist: error: config field 'model.dtype' = 'float16': training runs in float32 or bfloat16"]


# ---------------------------------------------------------------- distill-dist config

def test_config_command_prints_yaml_that_round_trips(tmp_path, capsys):
    overrides = [f"output_dir={tmp_path / 'run'}", "train.lr=0.002", "export.types=[q8_0]", "prune.schedule=[0.25]"]
    assert cli.main(["config", *overrides]) == 0
    printed = capsys.readouterr().out
    import yaml

    tree = yaml.safe_load(printed)
    assert tree["train"]["lr"] == 0.002 and tree["prune"]["schedule"] == [0.25]  # the overrides applied
    assert tree["train"]["output_dir"] == f"{tmp_path / 'run'}/kl"  # interpolations resolved
    saved = _yaml(tmp_path, printed)
    assert load_config(saved) == load_config(None, overrides) != load_config(None, [])
    assert cli.main(["config", "-c", str(saved)]) == 0
    assert capsys.readouterr().out == printed


@pytest.mark.parametrize("override, message", [
    ("train.lr=abc", "config field 'train.lr': Value 'abc' of type 'str' could not be converted to Float"),
    ("train.lrr=1", "unknown config key 'train.lrr'"),
])
def test_config_command_bad_input_is_one_line_exit_2(override, message):
    """The real process: one stderr line, exit status 2, nothing on stdout."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-m", "distill_dist.cli", "config", override], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith(f"distill-dist: error: {message}"), r.stderr


@pytest.mark.parametrize("command, sections", [("export", "output_dir, model, export"),
                                               ("plan", "model, teacher, data, prune, train")])
def test_command_help_names_its_sections_and_the_reference(capsys, command, sections):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"Config keys it reads: {sections} (" in text
    assert "docs/configuration.md" in text and "distill-dist config [-c FILE] [key=value ...]" in text


# ---------------------------------------------------------------- export.types spellings

def test_gguf_types_in_llamacpp_spelling_are_stored_lower_case(tmp_path, capsys):
    assert load_config(None, ["export.types=[Q8_0,Q4_K_M,F16,Bf16]"]).export.types == ["q8_0", "q4_k_m", "f16", "bf16"]
    assert load_config(_yaml(tmp_path, "export:\n  types: [Q6_K, q5_K_M]\n")).export.types == ["q6_k", "q5_k_m"]
    assert cli.main(["config", "export.types=[Q4_0]"]) == 0
    assert "  types:\n  - q4_0\n" in capsys.readouterr().out


def test_gguf_type_spellings_still_refuse_unknown_and_repeated_types():
    with pytest.raises(ConfigError, match=r"'export.types\[1\]' = 'q3_k_xs': expected one of f32, f16"):
        load_config(None, ["export.types=[F16,Q3_K_XS]"])
    with pytest.raises(ConfigError, match=r"'export.types' = \['q8_0', 'q8_0'\]: expected each type once"):
        load_config(None, ["export.types=[q8_0,Q8_0]"])


def test_tf32_is_a_float32_option_recorded_in_the_runs_config():
    """train.tf32 is off unless asked for, only with float32 weights (bfloat16 matmuls are not TF32's), and it
    is part of the config every run writes (config.yaml, to_yaml). On CPU setting it changes nothing."""
    import torch

    from distill_dist import runtime
    from distill_dist.config import to_yaml

    assert load_config(None, []).train.tf32 is False
    cfg = load_config(None, ["train.tf32=true"])
    assert "tf32: true" in to_yaml(cfg)
    with pytest.raises(ConfigError, match=r"^config field 'train.tf32' = True: expected false with "
                                          r"model.dtype=bfloat16 \(TF32 speeds up float32 matmuls only"):
        load_config(None, ["train.tf32=true", "model.dtype=bfloat16"])
    with pytest.raises(ConfigError, match=r"'train.tf32'"):
        load_config(None, ["train.tf32=maybe"])
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    runtime.set_tf32(True, torch.device("cpu"))
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before
