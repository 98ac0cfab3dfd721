"""What the command-line scripts share: running a fire command, and the demo model they default to.

A mistake in the user's input ends a command with one line that says what to change, not a
traceback, and a misspelled flag is refused before any work starts (fire itself would run the
whole job with defaults and complain at the end). In a torchrun group every failing process
says why, each distinct message once, and the others stop with one line.
"""

import difflib
import inspect
import sys
from collections.abc import Callable
from pathlib import Path

import fire

from llama.runtime import (
    TIMEOUT_ENV,
    close_process_group,
    collective_timeout,
    rank,
    say_once,
    silent_peers,
    world_size,
)

# The small model this repository ships in models/ (see MODEL_CARD.md): what the scripts run when
# no checkpoint is named, so the library can be tried without Meta's weights. It comes with a
# clone of the repository, not with an installed package.
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "llama-2-demo"

# Characters a terminal acts on instead of showing (escape sequences, carriage return, C1 controls);
# tab and newline are kept.
CONTROL_CHARACTERS = dict.fromkeys([*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)], "\ufffd")

# Mistakes in what the user gave: a wrong path, value or type.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError)


def printable(text: str) -> str:
    """Model output or user input, safe to print to a terminal: control characters and bytes that
    were not UTF-8 are shown as replacement characters, so no text can drive the terminal."""
    return text.translate(CONTROL_CHARACTERS).encode("utf-8", "replace").decode("utf-8")


def check_flags(main: Callable[..., None], argv: list[str]) -> None:
    """Refuse a --flag that main does not take, naming the closest one it does."""
    parameters = inspect.signature(main).parameters
    known = set(parameters) | {"help"}
    known |= {f"no{name}" for name, p in parameters.items() if isinstance(p.default, bool)}
    for arg in argv:
        if arg == "--":  # what follows is for fire itself
            return
        if not arg.startswith("--"):
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name not in known:
            close = difflib.get_close_matches(name, parameters, n=1)
            hint = f"did you mean --{close[0]}? " if close else ""
            flags = ", ".join(f"--{p}" for p in parameters)
            raise ValueError(f"unknown flag {arg.split('=', 1)[0]}: {hint}The flags are {flags}")


def where() -> str:
    """ " on rank N" in a group of several processes, so each message says who had the problem."""
    return f" on rank {rank()}" if world_size() > 1 else ""


def group_failure(err: RuntimeError) -> str | None:
    """What a failed collective means for the user, or None if err is not one."""
    text = str(err)
    if world_size() == 1 or not any(mark in text for mark in ("gloo", "Connection closed", "Timed out", "NCCL")):
        return None
    if "Timed out" in text or "timed out" in text:
        silent = silent_peers()
        who = f"rank {', '.join(map(str, silent))}" if silent else "a peer"
        seconds = collective_timeout().total_seconds()
        return f"stopping: {who} did not answer for {seconds:g} s (set {TIMEOUT_ENV} to wait longer)"
    return "stopping: another process of the group failed or ended (its own message says why)"


def run_script(main: Callable[..., None]) -> None:
    """Run a fire CLI: user mistakes, interruptions and failed peers end it with one line each."""
    try:
        check_flags(main, sys.argv[1:])
        fire.Fire(main)
    except USER_ERRORS as err:
        say_once(f"error{where()}: {err}")
        sys.exit(1)
    except KeyboardInterrupt:
        say_once("interrupted")
        sys.exit(130)
    except RuntimeError as err:
        failure = group_failure(err)
        if failure is None:
            raise
        say_once(f"rank {rank()}: {failure}", topic=failure)
        sys.exit(1)
    finally:
        close_process_group()
