"""
bench.py end to end on a tiny shape: every line of the table (ours and Hugging Face's GPT2LMHeadModel side by
side), the JSON file, and the refusals of bad flags. No timing assertions: the figures only have to exist.
"""

import json
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--vocab_size=64", "--block_size=64", "--seq_len=32",
        "--prefill_len=32", "--new_tokens=8", "--device=cpu"]
# tiny models need no threads; a busy machine makes extra threads wait on each other
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def bench(*args):
    return subprocess.run([sys.executable, "bench.py", *TINY, *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=180)


def test_bench_prints_every_figure_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    r = bench("--compare_hf=True", "--peak_size=128", "--repeats=2", "--warmup=0", "--group_size=32", f"--json={out}")
    assert r.returncode == 0, r.stderr
    table = r.stdout[r.stdout.index("metric"):]
    lines = ["peak matmul float32 128^3", "memory bandwidth (matrix-vector)", "train step 4x32 ", "train MFU 4x32",
             "prefill 32 tokens", "decode 16+8 KV cache ", "decode 16+8 KV cache int8",
             "decode 16+8 KV cache int4 g32", "decode 16+8 no cache"]
    for name in lines:
        assert name in table, f"{name!r} missing from\n{table}"
    assert "HF GPT2LMHeadModel" in table and "ms/iter" in table and "ms/token" in table
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["config"]["compare_hf"] is True
    rows = {(row["metric"], row["unit"]): row for row in result["rows"]}
    assert len(rows) == 11
    for (metric, unit), row in rows.items():
        assert 0 < row["ours"]["min"] <= row["ours"]["median"] <= row["ours"]["max"], row
        if not metric.startswith(("peak", "memory")):
            assert row["hf"]["median"] > 0 and row["speedup_vs_hf"] > 0, row  # every line has its HF figure
    assert "x fp32 weights" in rows[("decode 16+8 KV cache int8", "tok/s")]["note"]
    assert "x no cache" in rows[("decode 16+8 KV cache", "tok/s")]["note"]
    assert "of the bandwidth bound" in rows[("decode 16+8 KV cache int4 g32", "tok/s")]["note"]


@pytest.mark.parametrize("flags,message", [
    (["--new_tokens=60"], r"prompt_len \+ new_tokens \(76\) must fit in block_size \(64\)"),
    (["--quant_modes=int8,fp8"], r"mode must be one of \('int8', 'int4'\), got 'fp8'"),
    (["--compare_hf=True", "--bias=False"], r"--compare_hf needs --bias=True"),
])
def test_bench_refuses_bad_flags(flags, message, monkeypatch):
    # in-process: the checks run before any model is built, so this takes milliseconds
    monkeypatch.setattr(sys, "argv", ["bench.py", *TINY, *flags])
    with pytest.raises(ValueError, match=message):
        runpy.run_path(os.path.join(ROOT, "bench.py"), run_name="__main__")
