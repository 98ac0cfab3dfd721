"""ChatSession: a dialog kept within the window across turns, and later turns that reuse the cache."""

from pathlib import Path

import pytest
import torch

from llama import ChatSession, Llama
from llama.chat_format import encode_dialog

MESSAGES = ["Hi", "The cat sat on the mat", "Café 🙂 世界", "Red", "A dog runs", "Thanks"]


@pytest.fixture(scope="module")
def llama(checkpoint: Path, tokenizer_path: str) -> Llama:
    """A generator of its own, so no other test writes into the cache that a session reuses."""
    return Llama.build(str(checkpoint), tokenizer_path, max_seq_len=256, max_batch_size=1, device="cpu")


@pytest.fixture
def tokens_run(llama: Llama, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of tokens of every forward pass, in order."""
    lengths: list[int] = []
    hidden_states = llama.model.hidden_states

    def spy(tokens: torch.Tensor, start_pos):
        lengths.append(tokens.shape[1])
        return hidden_states(tokens, start_pos)

    monkeypatch.setattr(llama.model, "hidden_states", spy)
    return lengths


def converse(session: ChatSession, tokens_run: list[int]) -> tuple[list[str], list[int], list[int]]:
    """Send MESSAGES; return the answers, the exchanges dropped and the tokens prefilled at each turn."""
    answers, dropped, prefilled = [], [], []
    for message in MESSAGES:
        first_pass = len(tokens_run)
        turn_dropped, answer = session.send(message)
        answers.append("".join(answer))
        dropped.append(turn_dropped)
        prefilled.append(tokens_run[first_pass])
    return answers, dropped, prefilled


def test_cache_reuse_gives_the_answers_of_a_fresh_prefill(llama: Llama, tokens_run: list[int]) -> None:
    options = {"system": "Be brief.", "max_gen_len": 32, "temperature": 0}
    reused, reused_dropped, reused_prefilled = converse(ChatSession(llama, **options), tokens_run)
    fresh, fresh_dropped, fresh_prefilled = converse(ChatSession(llama, **options, reuse_cache=False), tokens_run)
    assert reused == fresh
    assert reused_dropped == fresh_dropped and any(fresh_dropped)  # reuse also survives dropping turns
    assert reused_prefilled[0] == fresh_prefilled[0]
    assert all(r < f for r, f in zip(reused_prefilled[1:], fresh_prefilled[1:]))


def test_oldest_exchanges_are_dropped_to_leave_room_for_the_answer(llama: Llama) -> None:
    session = ChatSession(llama, system="Be brief.", max_gen_len=100, temperature=0)
    dropped = []
    for message in MESSAGES:
        turn_dropped, answer = session.send(message)
        dropped.append(turn_dropped)
        prompt = encode_dialog(llama.tokenizer, session.dialog[:-1])
        assert len(prompt) + 100 <= 256
        "".join(answer)
    assert sum(dropped) > 0
    assert session.dialog[0] == {"role": "system", "content": "Be brief."}
    assert session.dialog[1]["content"] != MESSAGES[0]


def test_a_message_too_long_to_fit_alone_is_refused(llama: Llama) -> None:
    session = ChatSession(llama, max_gen_len=64, temperature=0)
    "".join(session.send("Hi")[1])
    before = list(session.dialog)
    with pytest.raises(ValueError, match="the message is too long"):
        session.send("the cat sat " * 100)
    assert session.dialog == before


def test_a_stopped_answer_stays_in_the_dialog(llama: Llama) -> None:
    session = ChatSession(llama, max_gen_len=32, temperature=0)
    _, answer = session.send("Hi")
    partial = "".join(next(answer) for _ in range(6))
    answer.close()
    assert session.dialog[-1] == {"role": "assistant", "content": partial}
    next_answer = "".join(session.send("Red")[1])
    fresh = llama.chat_completion([session.dialog[:-1]], max_gen_len=32, temperature=0)
    assert next_answer == fresh[0]["generation"]["content"]


def test_reset_keeps_only_the_system_prompt(llama: Llama) -> None:
    session = ChatSession(llama, system="Be brief.", max_gen_len=16, temperature=0)
    first = "".join(session.send("Hi")[1])
    "".join(session.send("Red")[1])
    session.reset()
    assert session.dialog == [{"role": "system", "content": "Be brief."}]
    assert "".join(session.send("Hi")[1]) == first


def test_special_tags_and_bad_lengths_are_refused(llama: Llama) -> None:
    session = ChatSession(llama, max_gen_len=16)
    with pytest.raises(ValueError, match="special tags"):
        session.send("say [INST] now")
    assert session.dialog == []
    with pytest.raises(ValueError, match="special tags"):
        ChatSession(llama, system="<<SYS>>")
    with pytest.raises(ValueError, match="max_gen_len must be between 1 and 255"):
        ChatSession(llama, max_gen_len=256)
