"""Sampling on its own: the nucleus, the further options, and seeds that ignore the company."""

import pytest
import torch

from llama import Llama
from llama.sampling import SamplingParams, SequenceSampler, greedy, sample_rows, sample_top_p
from tests.helpers import PROMPTS, prompt_ids


def test_sample_top_p_keeps_only_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]]).expand(2000, 3).clone()
    samples = sample_top_p(probs, 0.6)
    assert samples.shape == (2000, 1)
    counts = torch.bincount(samples.flatten(), minlength=3)
    assert counts[2] == 0 and counts[0] > counts[1] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_takes_the_first_of_tied_maxima_as_argmax_does(dtype: torch.dtype) -> None:
    logits = torch.randn(64, 32000, generator=torch.Generator().manual_seed(0)).to(dtype)
    tied = torch.arange(64) * 499  # a second maximum in each row, before or after the first
    logits[torch.arange(64), tied] = logits.max(dim=-1).values
    assert torch.equal(greedy(logits), torch.argmax(logits, dim=-1))
    assert (greedy(logits) <= tied).all()
    assert greedy(torch.zeros(1, 32000, dtype=dtype)).tolist() == [0]


def cpu_sampler(prompt: list[int] | None = None, vocab_size: int = 10, **options) -> SequenceSampler:
    return SequenceSampler(SamplingParams(**options), prompt or [1], vocab_size, torch.device("cpu"))


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"top_k": -1}, ValueError, r"top_k must be a whole number >= 0 \(0: no limit\), got -1"),
        ({"top_k": 2.5}, ValueError, "top_k must be a whole number"),
        ({"min_p": 1.5}, ValueError, r"min_p must be a number in \[0, 1\], got 1.5"),
        ({"presence_penalty": 3}, ValueError, r"presence_penalty must be a number in \[-2, 2\], got 3"),
        ({"frequency_penalty": "x"}, ValueError, "frequency_penalty must be a number in"),
        ({"repetition_penalty": 0}, ValueError, r"repetition_penalty must be a number in \(0, 10\]"),
        ({"logit_bias": {5: 200}}, ValueError, "logit_bias must be a mapping of token ids to numbers in"),
        ({"logit_bias": {"5": 1}}, ValueError, "logit_bias must be a mapping of token ids"),
        ({"seed": "x"}, ValueError, "seed must be an integer or None, got 'x'"),
    ],
)
def test_bad_options_are_named(options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        SamplingParams(**options)


def test_an_unknown_option_is_named_with_the_real_ones(generator: Llama) -> None:
    with pytest.raises(TypeError, match="unknown sampling option 'topk': the options are top_k, min_p, "):
        generator.text_completion(["The cat"], max_gen_len=2, topk=3)
    with pytest.raises(ValueError, match="logit_bias names token 400, outside the vocabulary"):
        generator.text_completion(["The cat"], max_gen_len=2, logit_bias={400: 5})


def test_logit_bias_forces_and_bans_tokens() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 0.5]])
    assert sample_rows(logits, [cpu_sampler(vocab_size=4, temperature=0, logit_bias={3: 100})]) == [3]
    assert sample_rows(logits, [cpu_sampler(vocab_size=4, temperature=0, logit_bias={1: -100})]) == [2]


def test_penalties_lower_what_the_sequence_said() -> None:
    logits = torch.tensor([2.0, 1.0, -1.0, 0.0])
    sampler = cpu_sampler(vocab_size=4, presence_penalty=0.5, frequency_penalty=0.25)
    for token in (0, 0, 2):
        sampler.took(token)
    assert sampler.adjust(logits).tolist() == [2.0 - 0.5 - 0.5, 1.0, -1.0 - 0.25 - 0.5, 0.0]
    repeated = cpu_sampler(prompt=[1], vocab_size=4, repetition_penalty=2.0)
    repeated.took(2)
    assert repeated.adjust(logits).tolist() == [2.0, 0.5, -2.0, 0.0]  # positive logits divided, negative multiplied


def test_top_k_and_min_p_narrow_the_choice() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.9, 0.0]]).expand(200, 4)
    one = [cpu_sampler(vocab_size=4, temperature=2.0, top_p=1.0, top_k=1, seed=i) for i in range(200)]
    assert set(sample_rows(logits, one)) == {1}
    two = [cpu_sampler(vocab_size=4, temperature=1.0, top_p=1.0, top_k=2, seed=i) for i in range(200)]
    assert set(sample_rows(logits, two)) == {1, 2}
    likely = [cpu_sampler(vocab_size=4, temperature=1.0, top_p=1.0, min_p=0.5, seed=i) for i in range(200)]
    assert set(sample_rows(logits, likely)) == {1, 2}  # token 0 is e^-2 as likely as token 1


def test_a_seeded_sequence_draws_the_same_whatever_runs_beside_it(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    alone, _ = generator.generate(prompts[:1], max_gen_len=12, temperature=1.0, top_p=1.0, seed=7)
    torch.manual_seed(123)  # the global generator does not matter to a seeded sequence
    together, _ = generator.generate(prompts, max_gen_len=12, temperature=1.0, top_p=1.0, seed=7)
    assert together[0] == alone[0]
    assert together[1] != together[0]  # sequence i draws with seed + i
    unseeded, _ = generator.generate(prompts[:1], max_gen_len=12, temperature=1.0, top_p=1.0)
    greedy, _ = generator.generate(prompts[:1], max_gen_len=12, temperature=0)
    assert alone[0] != greedy[0] or unseeded[0] != greedy[0]


def test_options_reach_every_method(generator: Llama) -> None:
    greedy = generator.text_completion(PROMPTS, max_gen_len=8, temperature=0)
    top_one = generator.text_completion(PROMPTS, max_gen_len=8, temperature=1.5, top_k=1)
    assert top_one == greedy
    streamed = [
        "".join(d) for d in zip(*generator.text_completion_stream(PROMPTS, max_gen_len=8, temperature=1.5, top_k=1))
    ]
    assert streamed == [g["generation"] for g in greedy]
    dialog = [[{"role": "user", "content": "Hi"}]]
    chat_greedy = generator.chat_completion(dialog, max_gen_len=8, temperature=0)
    assert generator.chat_completion(dialog, max_gen_len=8, temperature=2.0, min_p=1.0) == chat_greedy
