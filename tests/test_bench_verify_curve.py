"""scripts/bench_verify_curve.py: a real run on a tiny oracle reports a verify cost for every
row count asked, each against plain decoding in the same rounds (no timing ranges: a loaded
machine stalls)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench_verify_curve():
    return load_script("bench_verify_curve")


def test_a_real_run_reports_every_row_count(bench_verify_curve, oracle_path, tmp_path, capsys):
    out = tmp_path / "curve.json"
    assert bench_verify_curve.main(["-m", oracle_path, "-d", "0,40", "-k", "1,3", "--rounds", "3",
                                    "--upstream-reps", "0", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["depth"] for r in rows] == [0, 40]
    for r in rows:
        ours = {int(k): v for k, v in r["ours"].items()}
        assert set(ours) == {0, 1, 3} and ours[0] == 1.0
        assert all(math.isfinite(v) and v > 0 for v in ours.values())
    assert printed.count("| oracle.gguf |") == 4          # two depths x rows 2 and 4


def test_without_upstream_tools_it_says_how_to_build_them(bench_verify_curve, oracle_path, monkeypatch, capsys):
    monkeypatch.setattr(bench_verify_curve, "LLAMA_BENCH", Path("/nonexistent/llama-bench"))
    assert bench_verify_curve.main(["-m", oracle_path, "--rounds", "1"]) == 2
    assert "build_upstream.sh" in capsys.readouterr().err
