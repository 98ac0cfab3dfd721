"""The example scripts, run as users run them: plain python, and torchrun with two processes."""

import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT, environment, free_port, torchrun


def run_script(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)


def test_chat_example_with_plain_python(checkpoint: Path, tokenizer_path: str) -> None:
    done = run_script(
        [
            sys.executable,
            "example_chat_completion.py",
            "--ckpt_dir",
            str(checkpoint),
            "--tokenizer_path",
            tokenizer_path,
        ]
        + ["--max_gen_len", "8", "--temperature", "0"]
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("==================================") == 7
    assert done.stdout.count("> Assistant: ") == 7
    assert "System: Always answer with Haiku" in done.stdout
    assert "> Assistant: Error: special tags are not allowed as part of the prompt." in done.stdout


def test_text_example_under_torchrun_prints_once(checkpoint_2_shards: Path, tokenizer_path: str) -> None:
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), "example_text_completion.py")
    command += [
        "--ckpt_dir",
        str(checkpoint_2_shards),
        "--tokenizer_path",
        tokenizer_path,
        "--max_gen_len",
        "8",
        "--max_seq_len",
        "256",
    ]
    done = run_script(command)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("I believe the meaning of life is") == 1
    assert done.stdout.count("==================================") == 4
    assert done.stdout.count("Loaded in") == 1


def test_wrong_checkpoint_folder_is_one_clear_line(checkpoint: Path, tokenizer_path: str) -> None:
    done = run_script(
        [
            sys.executable,
            "example_text_completion.py",
            "--ckpt_dir",
            str(checkpoint.parent),
            "--tokenizer_path",
            tokenizer_path,
        ]
    )
    assert done.returncode == 1
    assert "error: no consolidated.NN.pth files" in done.stderr and "not its parent" in done.stderr
    assert "Traceback" not in done.stderr
