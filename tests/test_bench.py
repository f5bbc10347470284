"""pyllama-mtp-bench: argument expansion like llama-bench, every output format, and
speedups computed against the same run's draft-0 rows."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from pyllama_mtp.bench import output
from pyllama_mtp.bench.cli import main
from pyllama_mtp.bench.params import BenchTest, UsageError, parse_int_list, parse_pairs, bench_tests


@pytest.mark.parametrize("text, expected", [
    ("128", [128]),
    ("1,2,3", [1, 2, 3]),
    ("4-8+2", [4, 6, 8]),
    ("16-64*2", [16, 32, 64]),
    ("1-3,10", [1, 2, 3, 10]),
])
def test_ranges_expand_like_llama_bench(text, expected):
    assert parse_int_list(text, "-n") == expected


@pytest.mark.parametrize("text", ["", "a", "8-4", "1-8*1", "3,,4"])
def test_bad_ranges_are_usage_errors(text):
    with pytest.raises(UsageError):
        parse_int_list(text, "-n")


def test_pairs_and_test_labels():
    assert parse_pairs("512,128", "-pg") == [(512, 128)]
    tests = bench_tests([512], [128], [(64, 32)], [0, 4096], [0, 3])
    labels = [(t.label, t.n_draft) for t in tests]
    assert ("pp512", 0) in labels and ("tg128 @ d4096", 3) in labels and ("pp64+tg32 @ d4096", 0) in labels
    assert BenchTest(0, 128, 4096, 0).label == "tg128 @ d4096"


@pytest.fixture(scope="module")
def bench_records(oracle_path):
    args = ["-m", oracle_path, "-n", "24", "-p", "16", "-r", "2", "-t", "2", "--draft", "0,2", "--no-progress"]
    from pyllama_mtp.bench.cli import build_parser, run
    return run(build_parser().parse_args(args))


def test_records_have_llama_bench_and_mtp_fields(bench_records):
    assert len(bench_records) == 3   # pp16, tg24 draft 0, tg24 draft 2
    for r in bench_records:
        for field in output.FIELDS:
            assert field in r
        assert len(r["samples_ts"]) == 2 and r["avg_ts"] > 0


def test_speedup_is_against_the_same_runs_draft0_row(bench_records):
    tg = {r["n_draft"]: r for r in bench_records if r["n_gen"]}
    assert tg[0]["speedup"] == pytest.approx(1.0)
    assert tg[2]["speedup"] == pytest.approx(tg[2]["avg_ts"] / tg[0]["avg_ts"])
    assert tg[2]["accept_rate"] > 0.9          # oracle model at acceptance 1.0
    assert len(tg[2]["accept_rate_per_pos"]) == 2
    pp = next(r for r in bench_records if r["n_prompt"])
    assert pp["speedup"] is None


def test_every_output_format_parses(bench_records):
    parsed_json = json.loads(output.to_json(bench_records))
    assert [r["n_draft"] for r in parsed_json] == [r["n_draft"] for r in bench_records]
    lines = output.to_jsonl(bench_records).splitlines()
    assert all(set(json.loads(line)) == set(output.FIELDS) for line in lines)
    rows = list(csv.DictReader(io.StringIO(output.to_csv(bench_records))))
    assert len(rows) == 3 and float(rows[1]["avg_ts"]) > 0
    md = output.to_markdown(bench_records).splitlines()
    assert md[0].startswith("| model") and "t/s" in md[0] and "speedup" in md[0]
    assert len(md) == 2 + 3
    assert "±" in md[2] and "tg24" in md[3]


def test_bad_flags_give_a_usage_error(capsys):
    assert main(["-m", "x.gguf", "-n", "8-2"]) == 2
    assert "usage:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--no-such-flag"])
    assert e.value.code == 2


def test_missing_model_is_an_error_not_a_crash(tmp_path, capsys):
    assert main(["-m", str(tmp_path / "missing.gguf"), "-n", "4", "--no-progress"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_console_script_runs_a_builtin_model(tmp_path):
    env = {"PYLLAMA_MTP_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "pyllama_mtp.bench.cli", "-m", "tiny:step35", "-n", "16", "-r", "1",
                           "-t", "2", "-o", "json", "--no-progress"], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, **env})
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    assert [r["n_draft"] for r in records] == [0, 1, 2, 3, "auto"]
    assert records[-1]["speedup"] > 0             # auto is weighed against the same run's draft 0


def test_plot_without_matplotlib_says_which_extra_before_any_run():
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from pyllama_mtp.bench.cli import main\n"
            "sys.exit(main(['-m', 'tiny:step35', '--plot', 'out.png']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "pyllama-mtp-bench: error: --plot needs matplotlib: pip install 'pyllama-mtp[plot]'"]


def test_tests_take_turns_on_the_same_tokens_within_a_round(oracle_path):
    """A sweep's tests run in rounds, one repetition of each per round, each round starting
    at the next test, so that a shared machine's drift over minutes hits every draft length
    alike; the tests of a round draw the same random tokens, and each round new ones."""
    from pyllama_mtp.bench.params import Instance
    from pyllama_mtp.bench.runner import InstanceRunner
    from pyllama_mtp.config import SamplingParams
    inst = Instance(model=oracle_path, threads=2, n_gpu_layers=0, n_batch=512, n_ubatch=512, type_k="f16",
                    type_v="f16", flash_attn=-1)
    tests = bench_tests([0], [8], [], [0], [0, 2, "auto"])
    runner = InstanceRunner(oracle_path, inst, 128, 2, seed=7)
    order, prompts = [], []
    run_once = runner._run_once
    prefill = runner.session.seq_prefill

    def spy(test, m, sampling, policy, round_):
        runner.session.seq_prefill = lambda seq, tokens: (prompts.append(tuple(tokens)), prefill(seq, tokens))
        try:
            return run_once(test, m, sampling, policy, round_)
        finally:
            runner.session.seq_prefill = prefill

    runner._run_once = spy
    try:
        runner.check_exactness()
        got = runner.run(tests, 3, SamplingParams(), lambda r, t: order.append((r, t.n_draft)))
    finally:
        runner.close()
    assert order == [(-1, 0), (-1, 2), (-1, "auto"),
                     (0, 0), (0, 2), (0, "auto"),
                     (1, 2), (1, "auto"), (1, 0),
                     (2, "auto"), (2, 0), (2, 2)]
    rounds = [prompts[i:i + 3] for i in range(0, 12, 3)]
    assert all(len(set(r)) == 1 for r in rounds) and len({r[0] for r in rounds}) == 4
    assert [m.test.n_draft for m in got] == [0, 2, "auto"] and all(len(m.samples_ns) == 3 for m in got)
    assert got[1].accept_rate > 0.9 and got[2].n_steps > 0
