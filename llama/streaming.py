"""Text from tokens as they are generated: deltas that never split a character or a stop string.

Decoding each new token on its own goes wrong in two ways. SentencePiece keeps a word's space in
its first piece ("▁cat") but drops the space of the first piece of whatever it decodes, so
token-by-token text loses the spaces between words. And with byte fallback, one character (an
emoji, most CJK) can take several byte tokens: until the last one arrives, the bytes decode to
U+FFFD. So a stream decodes a short window of recent tokens, hands out only what the window added,
and holds back text that ends in U+FFFD until it either completes or the sequence ends.
"""

from collections.abc import Iterator

from llama.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"  # what SentencePiece makes of bytes that are not (yet) a whole character


class TokenDecoder:
    """Tokens in, text deltas out; the deltas add up to tokenizer.decode(all the tokens)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.window: list[int] = []  # the tokens decoded each step
        self.emitted = 0  # characters of decode(window) already handed out

    def push(self, token: int) -> str:
        """The new text once it ends in a whole character, else "" (the rest comes later)."""
        self.window.append(token)
        text = self.tokenizer.decode(self.window)
        if text.endswith(REPLACEMENT):
            return ""
        delta, self.emitted = text[self.emitted :], len(text)
        # The window can restart at a token whose text stands alone. Decoding the new window
        # drops that token's leading space, which `emitted` accounts for; the token's text is
        # non-empty, so no later piece loses its space. A control token (BOS) decodes to "" and a
        # stray byte to U+FFFD, so neither can start a window.
        anchor = self.tokenizer.decode([token])
        if anchor and REPLACEMENT not in anchor:
            self.window, self.emitted = [token], len(anchor)
        return delta

    def finish(self) -> str:
        """Text still held back at the end: bytes that never completed a character, as U+FFFD."""
        text = self.tokenizer.decode(self.window)
        delta, self.emitted = text[self.emitted :], len(text)
        return delta


class StopStrings:
    """Cuts text, arriving in pieces, before the earliest occurrence of any stop string.

    A tail that could be the start of a stop string is held back until the next piece decides it,
    so text that ends up cut is never handed out.
    """

    def __init__(self, stop: list[str]):
        self.stop = stop
        self.held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self.held += text
        matches = [at for at in (self.held.find(s) for s in self.stop) if at >= 0]
        if matches:
            self.stopped = True
            delta, self.held = self.held[: min(matches)], ""
            return delta
        keep = self.partial_match_length()
        delta, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        return delta

    def finish(self) -> str:
        """The held-back tail, once no more text will come to complete a stop string."""
        delta, self.held = self.held, ""
        return delta

    def partial_match_length(self) -> int:
        """Length of the longest tail of the held text that is a proper prefix of a stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.held)), longest, -1):
                if self.held.endswith(s[:n]):
                    longest = n
                    break
        return longest


def check_stop(stop: str | list[str] | None) -> list[str]:
    """Stop strings as a list: one string, or a list of them; none may be empty."""
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    for s in stop:
        if not isinstance(s, str) or not s:
            raise ValueError(f"stop strings must be non-empty strings, got {s!r}")
    return stop


class TextStream:
    """One generated sequence as text deltas: whole characters only, cut before its first stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]):
        self.decoder = TokenDecoder(tokenizer)
        self.stop = StopStrings(stop)

    @property
    def stopped(self) -> bool:
        return self.stop.stopped

    def push(self, token: int) -> str:
        return self.stop.push(self.decoder.push(token))

    def finish(self) -> str:
        return self.stop.push(self.decoder.finish()) + self.stop.finish()


def join_deltas(stream: Iterator[list[str]], count: int) -> list[str]:
    """The whole text of each of count sequences from a stream of per-step deltas."""
    parts: list[list[str]] = [[] for _ in range(count)]
    for deltas in stream:
        for part, delta in zip(parts, deltas):
            part.append(delta)
    return ["".join(part) for part in parts]
