"""A real 2-rank torchrun eval (gloo on CPU) gives the same results as one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from distill_dist import cli


def _read(out):
    res = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in (out / "examples.jsonl").read_text().splitlines()]
    return res, rows


@pytest.mark.multirank
def test_two_rank_eval_equals_single_process(tiny_olmo2_dir, synthetic_data_dir, tmp_path, free_port):
    # 39 rows: an odd count, so the ranks score different numbers of questions
    common = [f"model.path={tiny_olmo2_dir}", f"data.path={synthetic_data_dir}", "eval.limit=39",
              "eval.batch_size=4", "eval.device=cpu", f"output_dir={tmp_path}"]
    dist_out, single_out = tmp_path / "A", tmp_path / "B"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port),
           "-m", "distill_dist.cli", "eval", *common, f"eval.output_dir={dist_out}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"

    assert cli.main(["eval", *common, f"eval.output_dir={single_out}"]) == 0

    (d_res, d_rows), (s_res, s_rows) = _read(dist_out), _read(single_out)
    assert d_res["world_size"] == 2 and s_res["world_size"] == 1
    assert d_res["model"]["fingerprint"] == s_res["model"]["fingerprint"]
    assert d_res["metrics"]["n"] == s_res["metrics"]["n"] == 39
    for key, value in s_res["metrics"].items():
        if isinstance(value, float):
            assert d_res["metrics"][key] == pytest.approx(value, abs=1e-6), key
        else:
            assert d_res["metrics"][key] == value, key
    assert [r["id"] for r in d_rows] == [r["id"] for r in s_rows]
    assert len(set(r["id"] for r in d_rows)) == 39
    for d, s in zip(d_rows, s_rows):
        assert max(abs(a - b) for a, b in zip(d["logliks"], s["logliks"])) < 1e-5, d["id"]
        assert d["pred"] == s["pred"] and d["gold"] == s["gold"]
        assert any(v != 0 for v in d["logliks"]), "every row must have been scored by some rank"
    # only rank 0 writes
    assert sorted(p.name for p in dist_out.iterdir()) == ["config.yaml", "eval.json", "examples.jsonl"]
