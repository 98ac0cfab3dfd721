"""Streaming: deltas add up to the non-streamed text, whole characters only, and stop strings."""

import random
from types import SimpleNamespace

import pytest
import torch

from llama import Llama
from llama.chat_format import UNSAFE_ERROR
from llama.streaming import REPLACEMENT, StopStrings, TokenDecoder, join_deltas
from llama.tokenizer import Tokenizer

# Emoji and CJK fall back to bytes in the test tokenizer, several tokens per character.
TEXTS = [
    " Hello 🙂 世界, two  spaces",
    "naïve 中文\n\n🙂🙂 end",
    "  leading spaces and a family 👩\u200d👩\u200d👧",
    "Red",
]


class ScriptedModel:
    """Stands in for the transformer and 'generates' a given token sequence per row, then EOS.

    Lets the generation loop be tested on chosen text (emoji, CJK, spaces, stop strings) instead of
    whatever a random model happens to produce.
    """

    def __init__(self, scripts: list[list[int]], tokenizer: Tokenizer, max_seq_len: int = 256):
        self.scripts, self.eos_id, self.vocab_size = scripts, tokenizer.eos_id, tokenizer.n_words
        self.params = SimpleNamespace(max_seq_len=max_seq_len, max_batch_size=len(scripts), vocab_size=self.vocab_size)
        self.tok_embeddings = SimpleNamespace(weight=torch.zeros(1))
        self.step = 0
        self.forward_passes = 0

    def hidden_states(self, tokens: torch.Tensor, start_pos: int | list[int]) -> torch.Tensor:
        self.forward_passes += 1
        if start_pos == 0:  # a prefill: start the scripts over
            self.step = 0
        return torch.zeros(tokens.shape[0], tokens.shape[1], 1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(self.scripts), self.vocab_size)
        for row, script in enumerate(self.scripts):
            logits[row, script[self.step] if self.step < len(script) else self.eos_id] = 1.0
        self.step += 1
        return logits


def scripted(tokenizer: Tokenizer, texts: list[str]) -> Llama:
    return Llama(ScriptedModel([tokenizer.encode(t, bos=False, eos=False) for t in texts], tokenizer), tokenizer)


def deltas_of(decoder: TokenDecoder, tokens: list[int]) -> list[str]:
    return [decoder.push(t) for t in tokens] + [decoder.finish()]


def test_decoder_deltas_add_up_to_decode_for_emoji_cjk_and_spaces(tokenizer: Tokenizer) -> None:
    for text in TEXTS:
        tokens = tokenizer.encode(text, bos=False, eos=False)
        deltas = deltas_of(TokenDecoder(tokenizer), tokens)
        assert "".join(deltas) == tokenizer.decode(tokens)
        assert not any(REPLACEMENT in d for d in deltas)  # no character is ever handed out in pieces
    assert deltas_of(TokenDecoder(tokenizer), tokenizer.encode("a 🙂", bos=False, eos=False)).count("🙂") == 1


def test_decoder_deltas_add_up_to_decode_for_random_tokens(tokenizer: Tokenizer) -> None:
    """Any ids at all: stray bytes, BOS/EOS/unknown in the middle, lone '▁' pieces."""
    rng = random.Random(0)
    awkward = [0, 1, 2, tokenizer.sp_model.piece_to_id("▁")] + [
        tokenizer.sp_model.piece_to_id(f"<0x{b:02X}>") for b in (0x20, 0x41, 0x80, 0xE4, 0xB8, 0xAD, 0xF0, 0x9F)
    ]
    for _ in range(1000):
        tokens = [rng.choice(awkward) if rng.random() < 0.5 else rng.randrange(tokenizer.n_words) for _ in range(20)]
        assert "".join(deltas_of(TokenDecoder(tokenizer), tokens)) == tokenizer.decode(tokens)


def test_stop_strings_hold_back_what_may_start_one() -> None:
    stop = StopStrings(["\n\n", "END"])
    assert [stop.push(p) for p in ["one\n", "two\n", "\nthree"]] == ["one", "\ntwo", ""]
    assert stop.stopped and stop.finish() == ""
    stop = StopStrings(["END"])
    assert [stop.push(p) for p in ["the E", "N", "ding"]] == ["the ", "", "ENding"]
    assert stop.push("x E") == "x " and stop.finish() == "E" and not stop.stopped


def test_stop_strings_cut_at_the_earliest_match_of_any() -> None:
    stop = StopStrings(["cat", "a c"])
    assert stop.push("a cat") == "" and stop.stopped
    stop = StopStrings(["dog", "the"])
    assert stop.push("x the dog") == "x "


def test_streamed_text_completion_equals_text_completion_for_chosen_text(tokenizer: Tokenizer) -> None:
    generator = scripted(tokenizer, TEXTS)
    expected = [tokenizer.decode(tokenizer.encode(t, bos=False, eos=False)) for t in TEXTS]
    completions = generator.text_completion(["x"] * len(TEXTS), temperature=0)
    steps = list(generator.text_completion_stream(["x"] * len(TEXTS), temperature=0))
    assert [c["generation"] for c in completions] == expected
    assert ["".join(d) for d in zip(*steps)] == expected
    assert not any(REPLACEMENT in d for step in steps for d in step)


def test_stop_strings_cut_each_sequence_of_a_batch(tokenizer: Tokenizer) -> None:
    generator = scripted(tokenizer, TEXTS)
    stop = ["\n\n", "🙂", "spaces"]
    expected = [" Hello ", "naïve 中文", "  leading ", "Red"]
    streamed = join_deltas(generator.text_completion_stream(["x"] * 4, temperature=0, stop=stop), 4)
    completions = generator.text_completion(["x"] * 4, temperature=0, stop=stop)
    assert streamed == [c["generation"] for c in completions] == expected


def test_a_sequence_that_reaches_a_stop_string_stops_generating(tokenizer: Tokenizer) -> None:
    generator = scripted(tokenizer, ["one two three four five six seven", "one two"])
    text = generator.text_completion(["x", "x"], temperature=0, stop="two")
    assert [t["generation"] for t in text] == ["one ", "one "]
    assert generator.model.forward_passes == len(tokenizer.encode("one two", bos=False, eos=False))


def test_streamed_text_completion_equals_text_completion(generator: Llama) -> None:
    prompts = ["The cat", "Café 🙂 世界", " A dog sat on the mat", "Red"]
    completions = generator.text_completion(prompts, max_gen_len=24, temperature=0)
    streamed = join_deltas(generator.text_completion_stream(prompts, max_gen_len=24, temperature=0), len(prompts))
    assert streamed == [c["generation"] for c in completions]
    torch.manual_seed(5)
    sampled = generator.text_completion(prompts, max_gen_len=24, temperature=0.9)
    torch.manual_seed(5)
    streamed = join_deltas(generator.text_completion_stream(prompts, max_gen_len=24, temperature=0.9), len(prompts))
    assert streamed == [c["generation"] for c in sampled]


def test_streamed_chat_completion_equals_chat_completion(generator: Llama) -> None:
    dialogs = [
        [{"role": "user", "content": "Hi 🙂"}],
        [{"role": "user", "content": "say [INST] now"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    answers = generator.chat_completion(dialogs, max_gen_len=12, temperature=0)
    steps = list(generator.chat_completion_stream(dialogs, max_gen_len=12, temperature=0))
    assert ["".join(d) for d in zip(*steps)] == [a["generation"]["content"] for a in answers]
    assert steps[0][1] == UNSAFE_ERROR
    refused_only = list(generator.chat_completion_stream(dialogs[1:2], max_gen_len=12))
    assert refused_only == [[UNSAFE_ERROR]]


def test_stop_strings_on_a_model_batch_match_the_uncut_text(generator: Llama) -> None:
    prompts = ["The cat", "Red"]
    free = [c["generation"] for c in generator.text_completion(prompts, max_gen_len=20, temperature=0)]
    stop = free[0][5:8]
    cut = [c["generation"] for c in generator.text_completion(prompts, max_gen_len=20, temperature=0, stop=[stop])]
    assert cut == [f[: f.index(stop)] if stop in f else f for f in free]
    assert len(cut[0]) <= 5


@pytest.mark.parametrize("stop", ["", [""], [3], ["ok", None]])
def test_bad_stop_strings_are_rejected(generator: Llama, stop) -> None:
    with pytest.raises(ValueError, match="stop strings must be non-empty strings"):
        generator.text_completion_stream(["The cat"], stop=stop)


def test_stop_strings_cannot_be_combined_with_logprobs_or_echo(generator: Llama) -> None:
    with pytest.raises(ValueError, match="logprobs or echo"):
        generator.text_completion(["The cat"], stop=["x"], logprobs=True)
    with pytest.raises(ValueError, match="logprobs or echo"):
        generator.text_completion(["The cat"], stop=["x"], echo=True)
