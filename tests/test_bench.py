"""python -m llama.bench as users run it: sane rates, progress on stderr, no noise, refusals up front."""

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from llama.bench import DECODE_ROUNDS, of_bound
from tests.helpers import DEMO, ROOT, environment


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llama.bench", *args],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_the_demo_model_is_timed_over_the_tokens_it_is_asked_for_unquantized_and_int8(tmp_path: Path) -> None:
    """The demo model ends most answers at EOS; a benchmark that stopped there reported 507% of the bound."""
    results = tmp_path / "results.jsonl"
    done = bench(
        *("--ckpt_dir", str(DEMO), "--prompt_len", "16", "--new_tokens", "32", "--quantize", "none,int8"),
        *("--json_path", str(results)),
    )
    assert done.returncode == 0, done.stderr
    for report in map(json.loads, results.read_text().splitlines()):  # each decode between two reads of memory
        rates, reads = report["decode_rounds_tokens_per_s"], report["decode_rounds_bandwidth_bytes_per_s"]
        assert len(rates) == len(reads) == DECODE_ROUNDS
        assert report["decode_tokens_per_s_batch_1"] == statistics.median(rates)
        assert report["bandwidth_bytes_per_s"] == statistics.median(reads)
        ratios = [rate / (read / report["decode_bytes_per_token"]) for rate, read in zip(rates, reads)]
        assert report["decode_of_bound"] == pytest.approx(statistics.median(ratios))
    for name in ("prefill", "decode, batch 1"):
        lines = [line for line in done.stdout.splitlines() if line.startswith(name)]
        assert len(lines) == 2  # one table for each
        for line in lines:
            percent = int(re.search(r"(\d+)% of bound", line)[1])
            assert 0 < percent <= 100 or "a measurement problem" in line, line
    assert [line.split()[-1] for line in done.stdout.splitlines() if line.startswith("weights stored as")] == [
        "float32",
        "int8",
    ]
    comparison = done.stdout.splitlines()[-2:]  # each scheme's decode rate beside the unquantized one's
    assert comparison[0].startswith("float32") and " 1.00x" in comparison[0]
    assert comparison[1].startswith("int8")
    assert "> initializing" not in done.stdout  # fairscale's lines are gone
    steps = [line.split(" (")[0] for line in done.stderr.splitlines()]
    measurements = [
        "bench: matrix-multiply throughput",
        "bench: prefill",
        "bench: decode, batch 1, taking turns with reads of memory",
        "bench: decode, batch 8",
        "bench: mixed batch of 8, ours and Meta's loop",
    ]
    assert steps == [
        "bench: loading, weights as they are",
        *measurements,
        "bench: loading, weights as int8",
        *measurements,
    ]


def test_a_group_size_the_model_cannot_take_is_refused_before_anything_is_measured(tmp_path: Path) -> None:
    done = bench("--shape", "15M", "--quantize", "none,int4:g64", "--work_dir", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "error: int4:g64: layers.0.attention.wq.weight has 288 input features which is not a whole number of "
        "groups of 64: use a group size that divides 96, such as int4:g48"
    )
    assert "bench: loading" not in done.stderr


def test_a_rate_above_the_bound_is_called_a_measurement_problem() -> None:
    assert of_bound(0.8) == "80% of bound"
    assert of_bound(5.07) == "507% of bound: above what the machine allows, so a measurement problem (rerun it)"


def test_hugging_face_side_by_side_prints_no_warnings(tmp_path: Path) -> None:
    done = bench(
        "--shape", "15M", "--compare", "hf", "--prompt_len", "4", "--new_tokens", "4", "--work_dir", str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert "HF decode, batch 1" in done.stdout
    assert [line for line in done.stderr.splitlines() if not line.startswith("bench: ")] == []


def test_a_shape_the_machine_cannot_hold_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    done = bench("--shape", "70B", "--work_dir", str(tmp_path))
    assert done.returncode == 1
    assert re.fullmatch(
        r"error: this process needs about [\d.]+ GiB on cpu but only [\d.]+ GiB is available: .*\n", done.stderr
    )
    assert list(tmp_path.iterdir()) == []
