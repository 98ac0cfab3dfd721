"""The commands as users run them: one clear line for every mistake, flags checked before any work."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llama.cli import check_flags, printable
from tests.helpers import DEMO, ROOT, environment, killed_afterwards

FAULTY = str(Path(__file__).with_name("faulty_worker.py"))

# Every command, with the arguments it needs besides flags, and a flag it takes.
COMMANDS = {
    "example_text_completion.py": (["example_text_completion.py"], "--max_seq_len"),
    "example_chat_completion.py": (["example_chat_completion.py"], "--max_seq_len"),
    "chat.py": (["chat.py"], "--max_seq_len"),
    "llama.bench": (["-m", "llama.bench", "--ckpt_dir", str(DEMO)], "--new_tokens"),
    "llama.reshard": (["-m", "llama.reshard", str(DEMO), "/nonexistent/out"], "--model_parallel_size"),
    "llama.convert": (["-m", "llama.convert", str(DEMO), "/nonexistent/out"], "--tokenizer_path"),
    "llama.verify": (["-m", "llama.verify"], "--ckpt_dir"),
}


def run(args: list[str], timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout, **kwargs
    )


@pytest.mark.parametrize("name", COMMANDS)
def test_a_misspelled_flag_is_refused_before_any_work(name: str) -> None:
    args, flag = COMMANDS[name]
    misspelled = flag[:-2] + flag[-1] + flag[-2]  # the last two letters swapped
    started = time.monotonic()
    done = run(args + [misspelled, "2"], timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: unknown flag {misspelled}: did you mean {flag}? The flags are --")
    assert len(done.stderr.splitlines()) == 1 and "Loaded in" not in done.stdout
    assert time.monotonic() - started < 30


def test_flags_fire_accepts_are_accepted() -> None:
    def main(ckpt_dir: str = "x", model_parallel_size: int = 1, compile: bool = False) -> None: ...

    check_flags(main, ["--ckpt_dir", "a", "--model-parallel-size=2", "--compile", "--nocompile", "--help"])
    check_flags(main, ["--", "--interactive"])  # fire's own flags, after a bare --
    with pytest.raises(ValueError, match="unknown flag --compiled: did you mean --compile"):
        check_flags(main, ["--compiled"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--device", "cuda"], "error: device 'cuda' is not available: "),
        (["--device", "mps"], "error: device 'mps' is not supported: use one of cpu"),
        (["--device", "tpu9"], "error: unknown device 'tpu9': use one of cpu"),
        (["--dtype", "float8"], "error: unknown dtype 'float8': use one of float32"),
        (["--temperature", "-1"], "error: temperature must be 0 (greedy) or more, and finite, got -1"),
        (["--temperature", "hot"], "error: temperature must be a number (0 for greedy), got 'hot'"),
        (["--top_p", "2"], "error: top_p must be in (0, 1] (1 keeps every token), got 2"),
        (["--max_gen_len", "2.5"], "error: max_gen_len must be a whole number of tokens, got 2.5"),
        (["--max_batch_size", "True"], "error: max_batch_size must be a positive integer, got True"),
    ],
)
def test_a_bad_setting_is_one_line_naming_it(flags: list[str], message: str) -> None:
    done = run(["example_text_completion.py", *flags])
    assert done.returncode == 1
    assert done.stderr.startswith(message) and len(done.stderr.splitlines()) == 1, done.stderr


def test_ctrl_c_while_generating_says_interrupted(tmp_path: Path) -> None:
    command = [sys.executable, FAULTY, "--mode", "loop", "--ckpt_dir", str(DEMO), "--pid_dir", str(tmp_path)]
    with killed_afterwards(
        subprocess.Popen(
            command, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    ) as job:
        deadline = time.monotonic() + 60
        while not (tmp_path / "rank0.pid").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)  # well into generating
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
        assert job.returncode == 130
        assert stderr == "interrupted\n"


def test_ctrl_c_while_loading_says_interrupted(tmp_path: Path) -> None:
    # A shard that is a pipe with no writer: opening it blocks, in the middle of loading, for as
    # long as the test likes. The kernel names where a process waits for a pipe's other end.
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("params.json", "tokenizer.model"):
        shutil.copyfile(DEMO / name, folder / name)
    os.mkfifo(folder / "consolidated.00.pth")
    command = [sys.executable, "example_chat_completion.py", "--ckpt_dir", str(folder)]
    with killed_afterwards(
        subprocess.Popen(command, cwd=ROOT, env=environment(), stderr=subprocess.PIPE, text=True)
    ) as job:
        waiting_in = Path(f"/proc/{job.pid}/wchan")
        deadline = time.monotonic() + 60
        while waiting_in.read_text() != "wait_for_partner" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert waiting_in.read_text() == "wait_for_partner", "the job never got to opening its shard"
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
        assert job.returncode == 130
        assert stderr == "interrupted\n"


def test_output_cannot_drive_the_terminal() -> None:
    shown = printable("red \x1b[31mtext\x1b[0m\r\nline\tend\x07 \udcff café 🙂")
    assert shown == "red \ufffd[31mtext\ufffd[0m\ufffd\nline\tend\ufffd ? café 🙂"
