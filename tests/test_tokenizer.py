"""The SentencePiece wrapper on a model trained with Llama 2's settings."""

import pytest

from llama.tokenizer import Tokenizer


def test_special_ids_follow_llama2(tokenizer: Tokenizer) -> None:
    assert (tokenizer.sp_model.unk_id(), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (0, 1, 2, -1)
    assert tokenizer.n_words == 400


def test_encode_adds_bos_and_eos_on_request(tokenizer: Tokenizer) -> None:
    body = tokenizer.encode("the cat", bos=False, eos=False)
    assert tokenizer.encode("the cat", bos=True, eos=False) == [1, *body]
    assert tokenizer.encode("the cat", bos=True, eos=True) == [1, *body, 2]


def test_dummy_prefix_and_spaces_are_kept(tokenizer: Tokenizer) -> None:
    pieces = tokenizer.sp_model.encode("the cat", out_type=str)
    assert pieces[0].startswith("▁")
    for text in ["the  cat", "  leading", "trailing  ", "tab\there", "line\nbreak"]:
        assert tokenizer.decode(tokenizer.encode(text, bos=True, eos=True)) == text


def test_digits_are_split(tokenizer: Tokenizer) -> None:
    pieces = tokenizer.sp_model.encode("sat 2024 times", out_type=str)
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["2", "0", "2", "4"]


def test_unseen_characters_fall_back_to_bytes(tokenizer: Tokenizer) -> None:
    text = "日本語 🦙 ok"
    ids = tokenizer.encode(text, bos=False, eos=False)
    assert 0 not in ids  # no unknown token
    assert "<0xF0>" in [tokenizer.sp_model.id_to_piece(i) for i in ids]  # the emoji's first UTF-8 byte
    assert tokenizer.decode(ids) == text


def test_missing_model_file_is_reported(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="--tokenizer_path"):
        Tokenizer(str(tmp_path / "tokenizer.model"))


def test_corrupt_model_file_is_reported(tmp_path) -> None:
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer(str(path))
