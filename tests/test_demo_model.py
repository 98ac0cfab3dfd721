"""The demo model shipped in models/: its format, and that it answers questions it never saw."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama import Llama
from tests.helpers import DEMO, DEMO_MP2, ROOT, environment, free_port, torchrun
from tools.demo_data import held_out_dialogs, is_held_out, problem
from tools.evaluate_demo_model import answer_all

HELD_OUT = 100


def assert_meta_format(folder: Path, shards: int) -> None:
    """Meta's files, and a checklist.chk whose checksums hold."""
    files = {p.name for p in folder.iterdir()}
    expected = {f"consolidated.{i:02d}.pth" for i in range(shards)} | {"params.json", "tokenizer.model"}
    assert files == expected | {"checklist.chk"}
    for line in (folder / "checklist.chk").read_text().splitlines():
        digest, name = line.split("  ")
        assert hashlib.md5((folder / name).read_bytes()).hexdigest() == digest


def test_folders_are_in_meta_format_with_valid_checksums() -> None:
    for folder, shards in ((DEMO, 1), (DEMO_MP2, 2)):
        assert_meta_format(folder, shards)
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 20 * 2**20


def test_architecture_uses_grouped_query_attention() -> None:
    params = json.loads((DEMO / "params.json").read_text())
    assert params["n_kv_heads"] < params["n_heads"]
    assert params["ffn_dim_multiplier"] not in (None, 1.0)
    weights = torch.load(DEMO / "consolidated.00.pth", weights_only=True, mmap=True)
    assert weights["tok_embeddings.weight"].dtype == torch.bfloat16  # as Meta ships


def test_held_out_problems_are_a_tenth_that_training_never_draws() -> None:
    import random

    problems = [(a, op, b) for a in range(100) for b in range(100) for op in "+-" if op == "+" or a >= b]
    assert sum(is_held_out(*p) for p in problems) == pytest.approx(len(problems) / 10, rel=0.05)
    rng = random.Random(0)
    assert not any(is_held_out(*problem(rng, held_out=False)) for _ in range(5000))


@pytest.fixture(scope="module")
def single_process_answers() -> dict[bool, list[str]]:
    """Greedy answers to held-out problems, asked in trained phrasings (False) and in held-out ones (True)."""
    generator = Llama.build(str(DEMO), str(DEMO / "tokenizer.model"), max_seq_len=512, max_batch_size=25, device="cpu")
    return {held: answer_all(generator, [d for d, _ in held_out_dialogs(HELD_OUT, held_out_phrasing=held)])
            for held in (False, True)}  # fmt: skip


# Problems training never saw, in its phrasings and in phrasings it never saw: the floors issue #17
# asked for. The shipped model gets 97/100 and 90/100 of these.
ACCURACY_FLOOR = {False: 0.95, True: 0.9}


@pytest.mark.parametrize("held_out_phrasing", [False, True])
def test_answers_held_out_arithmetic(held_out_phrasing: bool, single_process_answers: dict) -> None:
    expected = [answer for _, answer in held_out_dialogs(HELD_OUT, held_out_phrasing=held_out_phrasing)]
    correct = sum(a == e for a, e in zip(single_process_answers[held_out_phrasing], expected))
    assert correct >= ACCURACY_FLOOR[held_out_phrasing] * HELD_OUT, f"{correct}/{HELD_OUT} correct"


def test_held_out_phrasings_are_ones_training_never_uses() -> None:
    import random

    from tools.demo_data import question

    rng = random.Random(0)
    trained = {question(rng, 12, "+", 34, held_out_phrasing=False) for _ in range(3000)}
    held_out = {question(rng, 12, "+", 34, held_out_phrasing=True) for _ in range(300)}
    assert trained and held_out and not trained & held_out


def test_two_processes_give_identical_answers(single_process_answers: dict, tmp_path: Path) -> None:
    command = torchrun(
        "--nproc_per_node", "2", "--master_port", str(free_port()), "--module", "tools.evaluate_demo_model"
    )
    command += ["--ckpt_dir", str(DEMO_MP2), "--questions", str(HELD_OUT), "--device", "cpu"]
    done = subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if " -> " in line]
    assert [line.split(" -> ", 1)[1] for line in lines] == single_process_answers[False] + single_process_answers[True]


def test_example_scripts_run_the_demo_model_by_default() -> None:
    chat = subprocess.run(
        [sys.executable, "example_chat_completion.py", "--temperature", "0"],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr[-3000:]
    assert "> Assistant: 8 + 7 = 15, 3 + 4 + 1 = 8, so 38 + 47 = 85." in chat.stdout
    assert "> Assistant: I am a tiny demo model, so I can't help with that." in chat.stdout
    text = subprocess.run(
        [sys.executable, "example_text_completion.py", "--temperature", "0"],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert text.returncode == 0, text.stderr[-3000:]
    assert text.stdout.count("==================================") == 4
    assert "> time and space depend on how fast you move." in text.stdout
    assert "> fromage" in text.stdout


def test_the_training_command_writes_both_folders_in_meta_format(tmp_path: Path) -> None:
    """Two steps, as a user would start a short trial run: fewer steps than the three progress checks."""
    out = tmp_path / "llama-2-demo"
    done = subprocess.run(
        [sys.executable, "-m", "tools.train_demo_model", "--out_dir", str(out), "--steps", "2"],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("held-out exact match:") == 2  # after each of the two steps
    for folder, shards in ((out, 1), (tmp_path / "llama-2-demo-mp2", 2)):
        assert_meta_format(folder, shards)
    assert json.loads((out / "params.json").read_text()) == json.loads((DEMO / "params.json").read_text())
    weights = torch.load(out / "consolidated.00.pth", weights_only=True)
    assert all(w.dtype == torch.bfloat16 for w in weights.values())
    assert Llama.build(str(out), None, max_seq_len=64, max_batch_size=1, device="cpu").tokenizer.n_words == 1000
