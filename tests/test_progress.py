"""Progress output that reads well in a log file: whole lines, a bounded number of them, no carriage return."""
from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from distill_dist.progress import LINES, LogLines, progress_bar

# The CLI decides for itself (an in-process cli.main() of another test may have set this here).
ENV_WITHOUT_BAR_SETTINGS = {**{k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"},
                            "OMP_NUM_THREADS": "1"}


def test_a_bar_into_a_string_stream_writes_a_line_per_tenth():
    out = io.StringIO()
    with progress_bar(range(1000), desc="work", unit="it", file=out) as bar:
        for i in bar:
            if i % 7 == 0:
                bar.set_postfix(loss=f"{i / 1000:.3f}")  # refreshes the bar on every call
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n")
    assert len(lines) == LINES + 1  # the start, then each tenth
    assert [l.split("|")[0] for l in lines] == [f"work: {p:3d}%" for p in range(0, 101, 10)]
    assert "1000/1000" in lines[-1]


def test_a_bar_into_a_pipe_that_stops_early_ends_on_where_it_stopped():
    read_fd, write_fd = os.pipe()
    with os.fdopen(write_fd, "w") as pipe:
        bar = progress_bar(total=200, initial=50, desc="resume", unit="step", file=pipe)  # a resumed run
        for _ in range(73):
            bar.update(1)
        bar.close()
    with os.fdopen(read_fd) as f:
        text = f.read()
    lines = text.splitlines()
    assert "\r" not in text
    assert "50/200" in lines[0] and "123/200" in lines[-1]
    assert len(lines) == 1 + 4 + 1  # the start at 25 %, lines at 30, 40, 50, 60 %, the stop at 61.5 %


def test_a_bar_without_a_total_and_a_disabled_bar():
    out = io.StringIO()
    with progress_bar(desc="open-ended", unit="it", file=out) as bar:
        bar.update(5)
    assert out.getvalue().splitlines() == [l for l in out.getvalue().split("\n") if l] and "\r" not in out.getvalue()
    assert len(out.getvalue().splitlines()) == 2 and "5it" in out.getvalue().splitlines()[-1]
    out = io.StringIO()
    with progress_bar(total=10, desc="other rank", unit="it", file=out, disable=True) as bar:
        bar.update(10)
    assert out.getvalue() == ""


def test_a_terminal_gets_tqdms_live_bar():
    """A real pseudo-terminal: isatty() is true, so the usual redrawn bar."""
    primary, secondary = os.openpty()
    with os.fdopen(secondary, "w") as tty:
        with progress_bar(total=3, desc="live", unit="it", file=tty) as bar:
            bar.update(3)
        assert not isinstance(bar, LogLines)
    assert b"\r" in os.read(primary, 65536)
    os.close(primary)


def test_eval_logged_to_a_file_has_no_carriage_return(tiny_olmo2_dir, synthetic_data_dir, tmp_path):
    """The real CLI, its stdout and stderr redirected to a file as a batch job's are."""
    log = tmp_path / "eval.log"
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-m", "distill_dist.cli", "eval", f"eval.model={tiny_olmo2_dir}",
                               f"data.path={synthetic_data_dir}", f"eval.output_dir={tmp_path / 'eval'}",
                               "data.max_length=64", "eval.batch_size=8", "eval.device=cpu"],
                              stdout=f, stderr=subprocess.STDOUT, env=ENV_WITHOUT_BAR_SETTINGS,
                              timeout=300).returncode
    text = log.read_text()
    assert code == 0, text
    assert "\r" not in text
    bar_lines = [l for l in text.splitlines() if l.startswith("eval:")]
    # 40 questions (mc: one sequence each) in batches of 8: the start and one line per batch
    assert len(bar_lines) == 6 and "40/40" in bar_lines[-1], text
    assert (tmp_path / "eval" / "eval.json").is_file()


def test_the_demos_teacher_training_bar_writes_lines_when_redirected(tiny_tokenizer, synthetic_data_dir, capfd):
    """The demo's own bar (the curve runs' bars are their CLI's, in their .log files); stderr is pytest's
    capture file here, as it is a log file under `distill-dist demo 2> demo.log`."""
    from distill_dist.config import load_config
    from distill_dist.demo import train_teacher
    from distill_dist.models import build_tiny_model

    cfg = load_config(None, [f"data.path={synthetic_data_dir}", "data.max_length=64", "demo.teacher_steps=30",
                             "demo.teacher_batch=4", "demo.train_examples=2000"])
    model = build_tiny_model(cfg.tiny, tiny_tokenizer)  # as the demo builds its teacher
    train_teacher(model, tiny_tokenizer, cfg)
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = [l for l in err.splitlines() if l.startswith("teacher training:")]
    assert len(lines) == LINES + 1 and "30/30" in lines[-1] and "loss=" in lines[-1], err
