"""chat.py as people run it: through a pipe, in a terminal, and under torchrun."""

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, environment, free_port, torchrun

# chat.py, as people run it. Greedy, so that answers can be compared across runs.
PIPED = ["Hi", "The cat sat", "/reset", "Hi", "the red sun " * 12, "the cat " * 50]


def chat_command(checkpoint: Path, tokenizer_path: str, max_seq_len: int, max_gen_len: int) -> list[str]:
    return ["chat.py", "--ckpt_dir", str(checkpoint), "--tokenizer_path", tokenizer_path, "--temperature", "0"] + [
        "--max_seq_len",
        str(max_seq_len),
        "--max_gen_len",
        str(max_gen_len),
    ]


def run_piped(command: list[str]) -> subprocess.CompletedProcess:
    return run_piped_lines(command, PIPED)


def run_piped_lines(command: list[str], lines: list[str]) -> subprocess.CompletedProcess:
    stdin = "".join(line + "\n" for line in lines)
    return subprocess.run(
        command, input=stdin, cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300
    )


def turns(stdout: str) -> list[str]:
    """What follows each prompt: the line read, then what the chat printed before the next prompt."""
    return stdout.split("User: ")[1:]


@pytest.fixture(scope="module")
def piped(checkpoint: Path, tokenizer_path: str) -> subprocess.CompletedProcess:
    return run_piped([sys.executable] + chat_command(checkpoint, tokenizer_path, 96, 24))


def test_piped_chat_answers_each_turn_and_exits_at_end_of_input(piped: subprocess.CompletedProcess) -> None:
    assert piped.returncode == 0, piped.stderr[-3000:]
    chunks = turns(piped.stdout)
    assert len(chunks) == len(PIPED) + 1 and chunks[-1] == "\n"  # end of input ends the last prompt
    assert chunks[0].startswith("Hi\nAssistant: ") and chunks[1].startswith("The cat sat\nAssistant: ")


def test_piped_chat_reset_starts_a_new_dialog(piped: subprocess.CompletedProcess) -> None:
    chunks = turns(piped.stdout)
    assert chunks[2] == "/reset\n(new dialog)\n"
    assert chunks[3] == chunks[0]  # the same first message, answered the same way in a fresh dialog


def test_piped_chat_drops_old_turns_and_refuses_what_cannot_fit(piped: subprocess.CompletedProcess) -> None:
    chunks = turns(piped.stdout)
    assert "(dropped the oldest 1 exchange(s) to stay within max_seq_len=96)\nAssistant: " in chunks[4]
    assert "error: the message is too long" in chunks[5]
    assert "Traceback" not in piped.stderr


def test_chat_under_torchrun_answers_like_one_process(
    piped: subprocess.CompletedProcess, checkpoint_2_shards: Path, tokenizer_path: str
) -> None:
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()))
    done = run_piped(command + chat_command(checkpoint_2_shards, tokenizer_path, 96, 24) + ["--compile"])
    assert done.returncode == 0, done.stderr[-3000:]
    # Rank 0 alone prints, every rank agreed, and the compiled decode step answered as the eager one.
    assert turns(done.stdout) == turns(piped.stdout)
    assert done.stdout.count("Type a message") == 1
    assert done.stdout.count("compiling the decode step (tens of seconds)...\n") == 1


def test_a_line_that_is_not_utf8_is_refused_and_the_chat_goes_on(checkpoint: Path, tokenizer_path: str) -> None:
    def chat(stdin: bytes) -> list[str]:
        done = subprocess.run(
            [sys.executable] + chat_command(checkpoint, tokenizer_path, 96, 24),
            input=stdin, cwd=ROOT, env=environment(), capture_output=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode()[-3000:]
        return turns(done.stdout.decode())

    with_bad_line, without = chat(b"Hi\n\xff\xfe broken\nRed\n"), chat(b"Hi\nRed\n")
    assert with_bad_line[1] == (
        "?? broken\nerror: the message is not valid Unicode at character 0 (an undecodable byte, as in input that "
        "is not UTF-8): fix or remove it\n"
    )
    assert with_bad_line[0] == without[0] and with_bad_line[2] == without[1]  # the dialog went on as it was


def test_the_prompt_and_answers_are_on_stdout(checkpoint: Path, tokenizer_path: str) -> None:
    done = subprocess.run(
        [sys.executable] + chat_command(checkpoint, tokenizer_path, 96, 24),
        input="Hi\n", cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0
    assert "User: Hi\nAssistant: " in done.stdout


class Terminal:
    """chat.py in a pseudo-terminal: what it prints, and keys typed into it."""

    def __init__(self, command: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: becomes chat.py, with the terminal as its own
            os.chdir(ROOT)
            os.execve(sys.executable, [sys.executable] + command, environment())
        self.output, self.read_up_to = b"", 0
        self.ended = False

    def expect(self, text: bytes, timeout: float = 60) -> None:
        """Wait for text to appear after what was expected last."""
        self.wait(lambda: text in self.output[self.read_up_to :], f"{text!r}", timeout)
        self.read_up_to = self.output.index(text, self.read_up_to) + len(text)

    def expect_some(self, count: int, timeout: float = 60) -> None:
        """Wait for count more bytes of output, whatever they are."""
        self.wait(lambda: len(self.output) >= self.read_up_to + count, f"{count} bytes", timeout)
        self.read_up_to += count

    def wait(self, done, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            try:
                self.output += os.read(self.fd, 4096) if ready else b""
            except OSError:  # the other side closed: chat.py has ended
                ready = []
            assert ready, f"no {what} within {timeout} s; the terminal shows:\n{self.output.decode()[-2000:]}"

    def type(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def exit_code(self) -> int:
        status = os.waitpid(self.pid, 0)[1]
        self.ended = True
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        """End chat.py if it still runs (a failed test), and close the terminal."""
        if not self.ended:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def test_chat_in_a_terminal_ctrl_c_stops_the_answer_not_the_session(checkpoint: Path, tokenizer_path: str) -> None:
    # Answers may be 1000 tokens long: long enough to be interrupted half-way.
    terminal = Terminal(chat_command(checkpoint, tokenizer_path, 2048, 1000))
    try:
        terminal.expect(b"User: ")
        terminal.type(b"Hi\r")
        terminal.expect(b"Assistant: ")
        terminal.expect_some(5)  # some of the answer has arrived
        terminal.type(b"\x03")
        terminal.expect(b" [stopped]\r\nUser: ", timeout=10)
        terminal.type(b"half a line\x03/reset\r")  # at the prompt, Ctrl-C clears the line
        terminal.expect(b"(new dialog)\r\nUser: ")
        terminal.type(b"\x04")
        assert terminal.exit_code() == 0
    finally:
        terminal.close()


def test_chat_on_a_folder_without_tokenizer_says_what_to_pass(tmp_path) -> None:
    from chat import main

    with pytest.raises(FileNotFoundError, match="pass --tokenizer_path"):
        main(ckpt_dir=str(tmp_path))


def test_the_prompt_has_line_editing_and_history(checkpoint: Path, tokenizer_path: str) -> None:
    terminal = Terminal(chat_command(checkpoint, tokenizer_path, 96, 8))
    try:
        terminal.expect(b"User: ")
        terminal.type(b"Red sun\r")
        terminal.expect(b"Assistant: ")
        terminal.expect(b"User: ")
        terminal.type(b"\x1b[A")  # Up: the last line comes back to be edited
        terminal.expect(b"Red sun")
        terminal.type(b"\x7f\x7f\x7fmoon\r")  # three backspaces, then a new word
        terminal.expect(b"Assistant: ")
        terminal.expect(b"User: ")
        terminal.type(b"\x04")
        assert terminal.exit_code() == 0
    finally:
        terminal.close()
    answers = [a.split(b"\r\n")[0].decode() for a in terminal.output.split(b"Assistant: ")[1:]]
    piped = run_piped_lines([sys.executable] + chat_command(checkpoint, tokenizer_path, 96, 8), ["Red sun", "Red moon"])
    assert answers == [turn.split("Assistant: ")[1].removesuffix("\n") for turn in turns(piped.stdout)[:2]]
