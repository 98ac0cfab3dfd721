"""The Llama 2 chat format: roles, tags, checks, and a dialog's token ids. Pure Python, no torch."""

from collections.abc import Callable, Iterator
from typing import Literal, Protocol, TypedDict, TypeVar

from llama.tokenizer import check_unicode

Role = Literal["system", "user", "assistant"]


class Message(TypedDict):
    role: Role
    content: str


Dialog = list[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."

Answer = TypeVar("Answer")


class Encoder(Protocol):
    def encode(self, s: str, bos: bool, eos: bool) -> list[int]: ...


def check_dialog(dialog: Dialog, index: int = 0) -> None:
    """Roles must be: an optional system message, then user/assistant alternating, ending with user."""
    where = f"dialog {index}"
    if not isinstance(dialog, list) or not dialog:
        raise ValueError(f"{where} must be a non-empty list of {{'role': ..., 'content': ...}} messages")
    for j, message in enumerate(dialog):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"{where}, message {j}: expected {{'role': ..., 'content': str}}, got {message!r}")
        check_unicode(message["content"], f"{where}, message {j}")
    turns = dialog[1:] if dialog[0]["role"] == "system" else dialog
    if not turns:
        raise ValueError(f"{where} has only a system message: add a user message after it")
    for j, message in enumerate(turns):
        expected = "user" if j % 2 == 0 else "assistant"
        if message["role"] != expected:
            position = j + len(dialog) - len(turns)
            raise ValueError(
                f"{where}, message {position} has role {message['role']!r} where {expected!r} is expected: "
                "use an optional 'system' message, then 'user' and 'assistant' alternating"
            )
    if turns[-1]["role"] != "user":
        raise ValueError(f"{where} ends with an assistant message: the last message must come from the user")


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in message["content"] for message in dialog for tag in SPECIAL_TAGS)


def refused_dialogs(dialogs: list[Dialog]) -> list[bool]:
    """Check every dialog; say which are refused because they smuggle in the format's own tags.

    Refused dialogs are answered with UNSAFE_ERROR and never reach the model.
    """
    if not isinstance(dialogs, list | tuple):
        raise TypeError(f"dialogs must be a list of dialogs, got {type(dialogs).__name__}")
    if dialogs and isinstance(dialogs[0], dict):
        raise TypeError("dialogs must be a list of dialogs, each a list of messages; this is one dialog: pass [dialog]")
    if len(dialogs) == 0:
        raise ValueError("no dialogs given: pass at least one dialog")
    for i, dialog in enumerate(dialogs):
        check_dialog(dialog, i)
    return [has_special_tags(dialog) for dialog in dialogs]


def with_refusals(refused: list[bool], answers: list[Answer], refusal: Callable[[], Answer]) -> list[Answer]:
    """The answers to the dialogs that were not refused, in order, with a refusal() in the others' places."""
    answered = iter(answers)
    return [refusal() if r else next(answered) for r in refused]


def stream_with_refusals(refused: list[bool], answers: Iterator[list[str]]) -> Iterator[list[str]]:
    """Per-step deltas for every dialog: a refused one gets UNSAFE_ERROR whole in the first step."""
    refusal = UNSAFE_ERROR  # in the first step only
    for deltas in answers:
        yield with_refusals(refused, deltas, lambda text=refusal: text)
        refusal = ""
    if refusal:  # no step ran (every dialog refused, or nothing to generate)
        yield [UNSAFE_ERROR if r else "" for r in refused]


def encode_dialog(tokenizer: Encoder, dialog: Dialog) -> list[int]:
    """Token ids of a dialog in the Llama 2 chat format.

    A system message is folded into the first user turn. Each finished exchange is
    BOS "[INST] user [/INST] answer " EOS; the open user turn is BOS "[INST] user [/INST]".
    """
    if dialog[0]["role"] == "system":
        merged = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
        dialog = [{"role": "user", "content": merged}] + dialog[2:]
    tokens: list[int] = []
    for prompt, answer in zip(dialog[::2], dialog[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens
