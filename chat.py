"""Chat in the terminal: `python chat.py` (the demo model), or `torchrun --nproc_per_node MP chat.py --ckpt_dir ...`.

Answers are printed as they are generated. /reset starts a new dialog (the system prompt stays),
/exit or end of input (Ctrl-D) quits, Ctrl-C stops the answer being written (at the prompt, it
clears the line). The prompt line has readline's editing and history. Under torchrun, rank 0
reads the terminal and sends each line to the other ranks, which generate the same answer in
lockstep; only rank 0 prints.
"""

import os
import readline
import signal
import sys
import termios
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from llama import Llama
from llama.cli import DEMO_MODEL_DIR, printable, run_script
from llama.runtime import is_main_process
from llama.session import ChatSession

HELP = "Type a message and press Enter. /reset starts a new dialog, /exit or Ctrl-D quits, Ctrl-C stops an answer."
# The other ranks wait for rank 0 while a person types. They wait on a group of their own, whose
# timeout such a pause cannot reach (the default group gives up after 10 or 30 minutes).
INPUT_TIMEOUT = timedelta(days=7)
CTRL_C = b"\x03"


def main(
    ckpt_dir: str = str(DEMO_MODEL_DIR),
    tokenizer_path: str | None = None,
    system: str | None = None,
    max_seq_len: int = 2048,
    max_gen_len: int | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    device: str | None = None,
    dtype: str | None = None,
    compile: bool = False,
    verify: bool = False,
    quantize: str | None = None,
):
    """With no --ckpt_dir, the demo model in models/; --tokenizer_path defaults to the checkpoint's.

    max_gen_len (default: a quarter of max_seq_len) is the room each answer gets in the window.
    --compile compiles the decode step before the first answer (tens of seconds): on a CPU, answers
    then come about twice as fast. --verify checks the checkpoint against its checklist.chk first.
    --quantize int8 or int4 quantizes the weights while loading: a quarter or an eighth of fp32's
    memory, and with --compile faster answers.
    """
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=1,
        device=device,
        dtype=dtype,
        compile=compile,
        verify=verify,
        quantize=quantize,
    )
    chat = ChatSession(generator, None if system is None else str(system), max_gen_len, temperature, top_p)
    if is_main_process():
        setup_terminal()
    if compile:
        say("compiling the decode step (tens of seconds)...")
        # One step of a prompt no dialog starts with, so the first turn's prefill is not shortened.
        generator.generate([[generator.tokenizer.eos_id]], max_gen_len=2, temperature=0)
    group = dist.new_group(backend="gloo", timeout=INPUT_TIMEOUT) if dist.get_world_size() > 1 else None
    keys = Keys()
    say(HELP)
    if system is not None:
        say(f"System: {system}")
    with keys.session():
        while (line := read_line(group)) is not None and line.strip() != "/exit":
            if line.strip() == "/reset":
                chat.reset()
                say("(new dialog)")
            elif line.strip():
                try:
                    dropped, answer = chat.send(line)
                except ValueError as err:
                    say(f"error: {err}")
                    continue
                if dropped:
                    say(f"(dropped the oldest {dropped} exchange(s) to stay within max_seq_len={max_seq_len})")
                print_answer(answer, group, keys)


def say(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


def read_line(group: dist.ProcessGroup | None) -> str | None:
    """Rank 0 reads a line and sends it to every rank; None at the end of input."""
    line = [prompt() if is_main_process() else None]
    if group is not None:
        dist.broadcast_object_list(line, src=0, group=group)
    return line[0]


def setup_terminal() -> None:
    """Lines that are not UTF-8 reach the chat, which refuses them with a message, instead of ending
    it. readline gives the prompt editing and history; Ctrl-C clears the line (see Keys)."""
    sys.stdin.reconfigure(errors="surrogateescape")
    if not sys.stdin.isatty():
        return
    readline.parse_and_bind(r'"\C-c": unix-line-discard')
    readline.parse_and_bind("set enable-bracketed-paste off")  # no escape codes around each prompt

    def keys_not_signals() -> None:
        # readline turns the terminal's signal keys back on while it reads; Ctrl-C must stay a key.
        mode = termios.tcgetattr(sys.stdin.fileno())
        mode[3] &= ~termios.ISIG
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSANOW, mode)

    readline.set_pre_input_hook(keys_not_signals)


def prompt() -> str | None:
    """A line from the user; bytes that are not UTF-8 come through as such (the chat refuses them)."""
    try:
        line = input("User: ")
    except EOFError:
        print()
        return None
    if not sys.stdin.isatty():
        print(printable(line))  # so that a piped session reads like a conversation
    return line


def print_answer(answer: Iterator[str], group: dist.ProcessGroup | None, keys: "Keys") -> None:
    """Print the answer as it streams, until it ends or Ctrl-C; every rank stops at the same step."""
    with keys.answering() as pressed:
        say("Assistant: ", end="")
        for delta in answer:
            say(printable(delta), end="")
            if stop_everywhere(pressed(), group):
                say(" [stopped]", end="")
                break
        say()


def stop_everywhere(pressed: bool, group: dist.ProcessGroup | None) -> bool:
    """Rank 0's answer to "was Ctrl-C pressed?", given to every rank."""
    if group is None:
        return pressed
    flag = torch.tensor([pressed])
    dist.broadcast(flag, src=0, group=group)
    return bool(flag)


class Keys:
    """Rank 0's terminal, set up so that Ctrl-C arrives as a key rather than as SIGINT.

    Under torchrun the terminal's SIGINT goes to torchrun, which ends every rank; a key reaches
    rank 0 alone, which tells the others. At the prompt Ctrl-C clears the line (readline's binding,
    see setup_terminal); while an answer streams it stops the answer, and other keys are ignored.
    On other ranks, or with input from a pipe, nothing changes.
    """

    def __init__(self):
        self.fd = sys.stdin.fileno() if is_main_process() and sys.stdin.isatty() else None

    @contextmanager
    def session(self) -> Iterator[None]:
        if self.fd is None:
            yield
            return
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~termios.ISIG
        # torchrun stops the ranks with SIGTERM: leave through `finally`, which restores the terminal.
        on_sigterm = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
        try:
            with self.mode(mode, termios.TCSANOW):
                yield
        finally:
            signal.signal(signal.SIGTERM, on_sigterm)

    @contextmanager
    def answering(self) -> Iterator[Callable[[], bool]]:
        """Yields pressed(): whether Ctrl-C was typed since it was last called."""
        if self.fd is None:
            yield lambda: False
            return
        mode = termios.tcgetattr(self.fd)
        mode[3] &= ~(termios.ICANON | termios.ECHO)
        mode[6][termios.VMIN], mode[6][termios.VTIME] = 0, 0  # reads return at once, empty if nothing was typed
        with self.mode(mode, termios.TCSAFLUSH):  # on the way out, drop the other keys
            yield lambda: CTRL_C in os.read(self.fd, 1024)

    @contextmanager
    def mode(self, mode: list, restore_when: int) -> Iterator[None]:
        saved = termios.tcgetattr(self.fd)
        termios.tcsetattr(self.fd, termios.TCSANOW, mode)
        try:
            yield
        finally:
            termios.tcsetattr(self.fd, restore_when, saved)


if __name__ == "__main__":
    run_script(main)
