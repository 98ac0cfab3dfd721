"""Generation: batching, logprobs, echo, EOS, sampling, the chat format and bad input."""

import copy

import pytest
import torch

from llama import Llama
from llama.generation import (
    B_INST,
    B_SYS,
    E_INST,
    E_SYS,
    UNSAFE_ERROR,
    encode_dialog,
    sample_top_p,
)
from llama.tokenizer import Tokenizer

PROMPTS = ["The cat", "A dog sat on the mat and the sun", "Red"]


def prompt_ids(tokenizer: Tokenizer, prompts: list[str] = PROMPTS) -> list[list[int]]:
    return [tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def test_batch_of_different_lengths_equals_each_prompt_alone(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    assert len({len(p) for p in prompts}) == 3
    batch, _ = generator.generate(prompts, max_gen_len=12, temperature=0)
    for prompt, tokens in zip(prompts, batch):
        alone, _ = generator.generate([prompt], max_gen_len=12, temperature=0)
        assert alone[0] == tokens
        assert len(tokens) > 0


def test_compiled_decode_step_gives_the_same_tokens(generator: Llama) -> None:
    prompts = prompt_ids(generator.tokenizer)
    eager, eager_logprobs = generator.generate(prompts, max_gen_len=12, temperature=0, logprobs=True)
    compiled = Llama(generator.model, generator.tokenizer, compile=True)
    for batch in (prompts, prompts[:1]):  # sequences at different positions, then one
        tokens, logprobs = compiled.generate(batch, max_gen_len=12, temperature=0, logprobs=True)
        assert tokens == eager[: len(batch)]
        for ours, theirs in zip(logprobs, eager_logprobs):
            assert ours == pytest.approx(theirs, abs=1e-4)


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


def test_sample_top_p_keeps_only_the_nucleus() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2]]).expand(2000, 3).clone()
    samples = sample_top_p(probs, 0.6)
    assert samples.shape == (2000, 1)
    counts = torch.bincount(samples.flatten(), minlength=3)
    assert counts[2] == 0 and counts[0] > counts[1] > 0


def test_text_completion_returns_reference_shapes(generator: Llama) -> None:
    plain = generator.text_completion(PROMPTS, max_gen_len=6, temperature=0)
    assert [set(p) for p in plain] == [{"generation"}] * 3
    detailed = generator.text_completion(PROMPTS, max_gen_len=6, temperature=0, logprobs=True, echo=True)
    for prediction, prompt in zip(detailed, PROMPTS):
        assert set(prediction) == {"generation", "tokens", "logprobs"}
        assert prediction["generation"].startswith(prompt)
        assert all(isinstance(t, str) for t in prediction["tokens"])
        assert len(prediction["tokens"]) == len(prediction["logprobs"])


def test_chat_format_without_system_prompt(tokenizer: Tokenizer) -> None:
    dialog = [{"role": "user", "content": "  Hi there  "}]
    expected = tokenizer.encode(f"{B_INST} Hi there {E_INST}", bos=True, eos=False)
    assert encode_dialog(tokenizer, dialog) == expected
    assert expected[0] == tokenizer.bos_id and tokenizer.decode(expected) == "[INST] Hi there [/INST]"


def test_chat_format_with_system_prompt_and_several_turns(tokenizer: Tokenizer) -> None:
    dialog = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": " Hello. "},
        {"role": "user", "content": "Sum 2 and 3"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "Thanks"},
    ]
    first = f"{B_INST} {B_SYS}Be brief.{E_SYS}Hi {E_INST} Hello. "
    expected = tokenizer.encode(first, bos=True, eos=True)
    expected += tokenizer.encode(f"{B_INST} Sum 2 and 3 {E_INST} 5 ", bos=True, eos=True)
    expected += tokenizer.encode(f"{B_INST} Thanks {E_INST}", bos=True, eos=False)
    ids = encode_dialog(tokenizer, dialog)
    assert ids == expected
    assert ids.count(tokenizer.bos_id) == 3 and ids.count(tokenizer.eos_id) == 2
    assert tokenizer.decode(ids[: ids.index(tokenizer.eos_id)]).startswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi")


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
