"""Decoding's steps on their own: sampling, a sequence's end, and what the cache rows hold."""

import torch

from llama import Llama
from llama.decoding import CacheRows, Sequence
from llama.sampling import SamplingParams, SequenceSampler
from llama.streaming import TextStream
from tests.helpers import prompt_ids


class Letters:
    """A tokenizer stand-in: token i is the i-th letter, 0 is EOS."""

    eos_id = 0

    def decode(self, tokens: list[int]) -> str:
        return "".join(chr(ord("a") + t - 1) for t in tokens if t != self.eos_id)


def sampler() -> SequenceSampler:
    return SequenceSampler(SamplingParams(), [1], vocab_size=27, device=torch.device("cpu"))


def streamed(budget: int, stop: list[str]) -> Sequence:
    return Sequence([1, 2], budget, eos_id=0, sampler=sampler(), stream=TextStream(Letters(), stop))


def test_a_sequence_finishes_at_eos_without_keeping_it() -> None:
    sequence = Sequence([1], budget=5, eos_id=0, sampler=sampler())
    for token, logprob in ((3, -0.5), (4, -0.25), (0, -1.0)):
        sequence.add(token, logprob)
    assert sequence.finish_reason == "stop"
    assert sequence.tokens == [3, 4] and sequence.logprobs == [-0.5, -0.25]


def test_a_sequence_finishes_when_its_budget_is_spent() -> None:
    sequence = Sequence([1], budget=2, eos_id=0, sampler=sampler())
    sequence.add(5)
    assert not sequence.finished
    sequence.add(6)
    assert sequence.finish_reason == "length" and sequence.tokens == [5, 6]
    assert Sequence([1], budget=0, eos_id=0, sampler=sampler()).finish_reason == "length"


def test_a_streamed_sequence_finishes_at_a_stop_string_and_hands_out_text_once() -> None:
    sequence = streamed(budget=10, stop=["cd"])
    sequence.add(1)
    sequence.add(2)
    assert sequence.take_text() == "ab" and sequence.take_text() == ""
    sequence.add(3)
    assert sequence.take_text() == "" and not sequence.finished  # "c" may start "cd"
    sequence.add(4)
    assert sequence.finish_reason == "stop" and sequence.take_text() == ""
    budgeted = streamed(budget=2, stop=["cd"])
    budgeted.add(2)
    budgeted.add(3)
    assert budgeted.finish_reason == "length" and budgeted.take_text() == "bc"  # the held-back tail comes out


def test_cache_rows_reuse_the_shared_prefix_and_leave_a_token_to_run() -> None:
    rows = CacheRows(2)
    rows.append(0, [1, 5, 6, 7])
    assert rows.reusable(0, [1, 5, 9]) == 2
    assert rows.reusable(0, [1, 5, 6, 7]) == 3  # the last token is run again for its logits
    assert rows.reusable(1, [1, 5]) == 0
    rows.forget_from(0, 2)
    assert rows.tokens[0] == [1, 5]


def test_the_decoder_records_what_each_row_holds(generator: Llama) -> None:
    decoder = generator._decoder
    sequences = decoder.sequences(prompt_ids(generator.tokenizer), 4, generator.tokenizer, SamplingParams(0.0))
    steps = len(list(decoder.run(sequences)))
    for row, sequence in enumerate(sequences):
        # Every token sampled before the last step was fed back (EOS too, while others went on);
        # a sequence finished earlier held still.
        fed = sequence.tokens + ([generator.tokenizer.eos_id] if sequence.finish_reason == "stop" else [])
        assert decoder.rows.tokens[row] == sequence.prompt + fed[: steps - 1]
