"""A conversation kept across turns, whose later turns reuse what the KV cache holds."""

from collections.abc import Iterator

from llama.chat_format import SPECIAL_TAGS, Dialog, Message, encode_dialog, has_special_tags
from llama.generation import Llama
from llama.sampling import SamplingParams
from llama.tokenizer import check_unicode


class ChatSession:
    """One conversation, answered turn by turn, that keeps its dialog (and its cache) across turns.

    The dialog is kept within max_seq_len by dropping the oldest exchanges, so that max_gen_len
    tokens stay free for each answer. With reuse_cache, a turn runs only the tokens the cache does
    not hold yet (the end of the last answer and the new message) instead of the whole dialog. The
    session assumes it is the only user of its Llama's cache between turns.
    """

    def __init__(
        self,
        generator: Llama,
        system: str | None = None,
        max_gen_len: int | None = None,
        temperature: float = 0.6,
        top_p: float = 0.9,
        reuse_cache: bool = True,
    ):
        max_seq_len = generator.model.params.max_seq_len
        if max_gen_len is None:
            max_gen_len = max_seq_len // 4
        if not 0 < max_gen_len < max_seq_len:
            raise ValueError(
                f"max_gen_len must be between 1 and {max_seq_len - 1} to leave room for the dialog "
                f"in max_seq_len={max_seq_len}, got {max_gen_len}"
            )
        SamplingParams(temperature, top_p)  # checked now, not at the first turn
        if system is not None and has_special_tags([{"role": "system", "content": system}]):
            raise ValueError(f"the system prompt contains one of the special tags {', '.join(SPECIAL_TAGS)}: remove it")
        self.generator = generator
        self.max_gen_len, self.temperature, self.top_p = max_gen_len, temperature, top_p
        self.reuse_cache = reuse_cache
        self.system: Dialog = [] if system is None else [{"role": "system", "content": system}]
        self.dialog: Dialog = list(self.system)

    def reset(self) -> None:
        """Start a new dialog; the system prompt stays."""
        self.dialog = list(self.system)

    def send(self, message: str) -> tuple[int, Iterator[str]]:
        """Add the user's message; return how many of the oldest exchanges were dropped, and the answer.

        The answer is text deltas as they are generated. It joins the dialog as it streams, so an
        answer the caller stops reading stays in the dialog as far as it got. A message with special
        tags, or one too long to fit even alone, raises ValueError and leaves the dialog as it was.
        """
        check_unicode(message, "the message")
        if has_special_tags([{"role": "user", "content": message}]):
            raise ValueError(f"the message contains one of the special tags {', '.join(SPECIAL_TAGS)}; it was not sent")
        dialog, dropped = self.fit(self.dialog + [{"role": "user", "content": message}])
        answer: Message = {"role": "assistant", "content": ""}
        self.dialog = dialog + [answer]
        return dropped, self.stream_answer(encode_dialog(self.generator.tokenizer, dialog), answer)

    def fit(self, dialog: Dialog) -> tuple[Dialog, int]:
        """Drop the oldest exchanges until the dialog leaves max_gen_len tokens of the window free."""
        room = self.generator.model.params.max_seq_len - self.max_gen_len
        first, dropped = len(self.system), 0
        while (length := len(encode_dialog(self.generator.tokenizer, dialog))) > room:
            if len(dialog) == first + 1:
                raise ValueError(
                    f"the message is too long: in the chat format, with the system prompt if any, it takes "
                    f"{length} tokens, but only {room} fit beside a {self.max_gen_len}-token answer in "
                    f"max_seq_len={room + self.max_gen_len}; shorten it, or use a larger max_seq_len or a "
                    "smaller max_gen_len"
                )
            dialog, dropped = dialog[:first] + dialog[first + 2 :], dropped + 1
        return dialog, dropped

    def stream_answer(self, prompt_tokens: list[int], answer: Message) -> Iterator[str]:
        steps = self.generator.generate_stream(
            [prompt_tokens], self.max_gen_len, self.temperature, self.top_p, reuse_cache=self.reuse_cache
        )
        for deltas in steps:
            answer["content"] += deltas[0]
            yield deltas[0]
