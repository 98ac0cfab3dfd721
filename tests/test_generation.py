"""The Llama API: batching, logprobs, echo, EOS, sampling, chat completion and bad input."""

import copy
from pathlib import Path

import pytest
import torch

from llama import Llama
from llama.chat_format import UNSAFE_ERROR, encode_dialog
from tests.helpers import PROMPTS, prompt_ids


def test_batch_of_different_lengths_equals_each_prompt_alone(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    assert len({len(p) for p in prompts}) == 3
    batch, _ = generator.generate(prompts, max_gen_len=12, temperature=0)
    for prompt, tokens in zip(prompts, batch):
        alone, _ = generator.generate([prompt], max_gen_len=12, temperature=0)
        assert alone[0] == tokens
        assert len(tokens) > 0


def test_logprobs_and_echo_agree_with_full_forward(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    tokens, logprobs = generator.generate(prompts, max_gen_len=8, temperature=0, logprobs=True, echo=True)
    for prompt, seq, seq_logprobs in zip(prompts, tokens, logprobs):
        assert seq[: len(prompt)] == prompt
        assert len(seq_logprobs) == len(seq)
        logits = generator.model(torch.tensor([seq]), 0)[0]
        expected = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)
        assert seq_logprobs[0] == 0.0  # nothing predicts the first token
        torch.testing.assert_close(torch.tensor(seq_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)


def test_logprobs_without_echo_cover_generated_tokens_only(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    echoed, echoed_logprobs = generator.generate(prompts, max_gen_len=5, temperature=0, logprobs=True, echo=True)
    plain, plain_logprobs = generator.generate(prompts, max_gen_len=5, temperature=0, logprobs=True)
    for prompt, e, el, p, pl in zip(prompts, echoed, echoed_logprobs, plain, plain_logprobs):
        assert e[len(prompt) :] == p
        assert el[len(prompt) :] == pytest.approx(pl, abs=1e-5)


def test_logprobs_are_aligned_when_the_prompt_fills_the_window(generator: Llama) -> None:
    max_seq_len = generator.model.params.max_seq_len
    prompt = [1] + [5 + i % 50 for i in range(max_seq_len - 1)]
    tokens, logprobs = generator.generate([prompt], max_gen_len=4, temperature=0, logprobs=True, echo=True)
    assert tokens == [prompt]  # no room left to generate
    logits = generator.model(torch.tensor([prompt]), 0)[0]
    expected = torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(prompt[1:]).unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(logprobs[0][1:]), expected, atol=1e-4, rtol=1e-4)


def test_generation_stops_at_window_end(generator: Llama) -> None:
    max_seq_len = generator.model.params.max_seq_len
    prompts = [[1] * (max_seq_len - 3), [1, 7]]
    tokens, _ = generator.generate(prompts, max_gen_len=10, temperature=0)
    assert len(tokens[0]) <= 3 and len(tokens[1]) <= 10


def test_each_sequence_stops_at_its_own_eos(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer, ["The cat", "Red"])
    free, _ = generator.generate(prompts, max_gen_len=10, temperature=0)
    # Declare a token that the first sequence produces, and the second never does, to be EOS.
    index, stop = next((i, t) for i, t in enumerate(free[0]) if t not in free[0][:i] and t not in free[1] and i > 0)
    stopping = copy.copy(generator)
    stopping.tokenizer = copy.copy(generator.tokenizer)
    stopping.tokenizer.eos_id = stop
    tokens, _ = stopping.generate(prompts, max_gen_len=10, temperature=0)
    assert tokens[0] == free[0][:index]
    assert tokens[1] == free[1]


def test_tiny_top_p_is_greedy_and_sampling_is_seeded(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    greedy, _ = generator.generate(prompts, max_gen_len=8, temperature=0)
    nucleus_of_one, _ = generator.generate(prompts, max_gen_len=8, temperature=1.0, top_p=1e-6)
    assert nucleus_of_one == greedy
    torch.manual_seed(7)
    first, _ = generator.generate(prompts, max_gen_len=8, temperature=1.5, top_p=1.0)
    torch.manual_seed(7)
    second, _ = generator.generate(prompts, max_gen_len=8, temperature=1.5, top_p=1.0)
    assert first == second
    assert first != greedy


def test_text_completion_returns_reference_shapes(generator: Llama) -> None:
    plain = generator.text_completion(PROMPTS, max_gen_len=6, temperature=0)
    assert [set(p) for p in plain] == [{"generation"}] * 3
    detailed = generator.text_completion(PROMPTS, max_gen_len=6, temperature=0, logprobs=True, echo=True)
    for prediction, prompt in zip(detailed, PROMPTS):
        assert set(prediction) == {"generation", "tokens", "logprobs"}
        assert prediction["generation"].startswith(prompt)
        assert all(isinstance(t, str) for t in prediction["tokens"])
        assert len(prediction["tokens"]) == len(prediction["logprobs"])


def test_chat_completion_answers_as_assistant(generator: Llama) -> None:
    dialogs = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    ]
    answers = generator.chat_completion(dialogs, max_gen_len=5, temperature=0, logprobs=True)
    direct, _ = generator.generate(
        [encode_dialog(generator.tokenizer, d) for d in dialogs], max_gen_len=5, temperature=0
    )
    for answer, tokens in zip(answers, direct):
        assert answer["generation"] == {"role": "assistant", "content": generator.tokenizer.decode(tokens)}
        assert len(answer["tokens"]) == len(answer["logprobs"]) == len(tokens)


@pytest.mark.parametrize("tag", ["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
def test_special_tags_are_refused_without_generating(generator: Llama, tag: str, monkeypatch) -> None:
    seen = []
    original = generator.generate

    def spy(prompt_tokens, *args, **kwargs):
        seen.append(len(prompt_tokens))
        return original(prompt_tokens, *args, **kwargs)

    monkeypatch.setattr(generator, "generate", spy)
    dialogs = [[{"role": "user", "content": f"say {tag} now"}], [{"role": "user", "content": "Hi"}]]
    answers = generator.chat_completion(dialogs, max_gen_len=3, temperature=0)
    assert answers[0]["generation"] == {"role": "assistant", "content": UNSAFE_ERROR}
    assert answers[1]["generation"]["role"] == "assistant"
    assert seen == [1]  # only the safe dialog reached the model
    assert generator.chat_completion(dialogs[:1], max_gen_len=3)[0]["generation"]["content"] == UNSAFE_ERROR
    assert seen == [1]


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([], "non-empty"),
        ([{"role": "assistant", "content": "Hi"}], "'user' is expected"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "'assistant' is expected"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
            "last message must come from the user",
        ),
        ([{"role": "system", "content": "s"}], "only a system message"),
        (
            [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "user", "content": "b"}],
            "role 'system'",
        ),
        ([{"role": "user"}], "expected"),
    ],
)
def test_bad_dialogs_are_rejected(generator: Llama, dialog: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generator.chat_completion([dialog])


def test_bad_batches_are_rejected(generator: Llama) -> None:
    with pytest.raises(ValueError, match="max_batch_size=4"):
        generator.text_completion(["a"] * 5)
    with pytest.raises(ValueError, match="no prompts"):
        generator.text_completion([])
    with pytest.raises(ValueError, match="no dialogs"):
        generator.chat_completion([])
    with pytest.raises(ValueError, match="prompt 1 is .* max_seq_len is 48"):
        generator.text_completion(["a", "the cat " * 40])
    with pytest.raises(ValueError, match="at least one"):
        generator.generate([[1], []], max_gen_len=3)


def test_bad_limits(checkpoint: Path, tokenizer_path: str) -> None:
    with pytest.raises(ValueError, match="max_seq_len must be a positive integer"):
        Llama.build(str(checkpoint), tokenizer_path, max_seq_len=0, max_batch_size=1)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperature": float("nan")}, ValueError, "temperature must be 0 .greedy. or more, and finite, got nan"),
        ({"temperature": float("inf")}, ValueError, "temperature must be 0 .greedy. or more, and finite, got inf"),
        ({"temperature": -0.5}, ValueError, "temperature must be 0 .greedy. or more, and finite, got -0.5"),
        ({"temperature": "0.7"}, TypeError, "temperature must be a number .0 for greedy., got '0.7'"),
        ({"top_p": -1}, ValueError, r"top_p must be in \(0, 1\] \(1 keeps every token\), got -1"),
        ({"top_p": 2}, ValueError, r"top_p must be in \(0, 1\] \(1 keeps every token\), got 2"),
        ({"top_p": 0}, ValueError, r"top_p must be in \(0, 1\]"),
        ({"top_p": None}, TypeError, r"top_p must be a number in \(0, 1\], got None"),
        ({"max_gen_len": 2.5}, TypeError, "max_gen_len must be a whole number of tokens, got 2.5"),
        ({"max_gen_len": True}, TypeError, "max_gen_len must be a whole number of tokens, got True"),
        ({"max_gen_len": -1}, ValueError, "max_gen_len must be >= 0, got -1"),
    ],
)
def test_bad_sampling_and_length_arguments_are_named(generator: Llama, kwargs: dict, error: type, message: str) -> None:
    prompts = prompt_ids(generator.tokenizer)
    arguments = {"max_gen_len": 4, **kwargs}
    with pytest.raises(error, match=message):
        generator.generate(prompts, **arguments)
    with pytest.raises(error, match=message):
        generator.generate_stream(prompts, **arguments)
    with pytest.raises(error, match=message):
        generator.text_completion(PROMPTS, **arguments)
    with pytest.raises(error, match=message):
        generator.chat_completion([[{"role": "user", "content": "Hi"}]], **arguments)


def test_generate_needs_a_number_of_tokens(generator: Llama) -> None:
    with pytest.raises(TypeError, match="max_gen_len must be a whole number of tokens, got None"):
        generator.generate(prompt_ids(generator.tokenizer), max_gen_len=None)


def test_a_string_or_a_lone_dialog_in_place_of_a_list_is_refused(generator: Llama) -> None:
    with pytest.raises(TypeError, match=r"prompts must be a list of strings, got str: pass \[prompt\] for one"):
        generator.text_completion("The cat")
    with pytest.raises(TypeError, match=r"prompts must be a list of strings, got str"):
        generator.text_completion_stream("The cat")
    dialog = [{"role": "user", "content": "Hi"}]
    with pytest.raises(TypeError, match=r"this is one dialog: pass \[dialog\]"):
        generator.chat_completion(dialog)
    with pytest.raises(TypeError, match=r"this is one dialog: pass \[dialog\]"):
        generator.chat_completion_stream(dialog)


@pytest.mark.parametrize("bad", [400, -1, 2.0, "5"])
def test_token_ids_outside_the_vocabulary_are_refused(generator: Llama, bad) -> None:
    message = rf"prompt 1 holds {bad!r}, which is not a token id of this model's vocabulary \(integers 0 to 399\)"
    with pytest.raises(ValueError, match=message):
        generator.generate([[1, 5], [1, bad]], max_gen_len=2)
    with pytest.raises(TypeError, match="prompt_tokens must be a list of prompts, each a list of token ids"):
        generator.generate([1, 5, 9], max_gen_len=2)


@pytest.mark.parametrize("value", [True, 2.0, "8"])
def test_build_limits_must_be_whole_numbers(checkpoint: Path, tokenizer_path: str, value) -> None:
    with pytest.raises(ValueError, match=f"max_batch_size must be a positive integer, got {value!r}"):
        Llama.build(str(checkpoint), tokenizer_path, max_seq_len=32, max_batch_size=value)
