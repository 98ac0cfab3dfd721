"""SentencePiece tokenizer wrapper with Llama 2's special ids."""

import os
from collections.abc import Iterable

from sentencepiece import SentencePieceProcessor, SentencePieceTrainer


def check_unicode(text: str, what: str) -> None:
    """SentencePiece cannot encode lone surrogates, which stand for bytes that did not decode as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} is not valid Unicode at character {err.start} (an undecodable byte, as in input that is not "
            "UTF-8): fix or remove it"
        ) from err


class Tokenizer:
    def __init__(self, model_path: str):
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"tokenizer model not found at {model_path!r}: pass --tokenizer_path pointing to the "
                "tokenizer.model that came with the weights"
            )
        try:
            self.sp_model = SentencePieceProcessor(model_file=model_path)
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"{model_path!r} is not a SentencePiece model ({err}); use the tokenizer.model file"
            ) from err
        self.n_words: int = self.sp_model.vocab_size()
        self.bos_id: int = self.sp_model.bos_id()
        self.eos_id: int = self.sp_model.eos_id()
        self.pad_id: int = self.sp_model.pad_id()  # -1 in Llama 2: no padding token exists

    def encode(self, s: str, bos: bool, eos: bool) -> list[int]:
        if not isinstance(s, str):
            raise TypeError(f"expected a string to encode, got {type(s).__name__}")
        check_unicode(s, "the text")
        tokens = self.sp_model.encode(s)
        return ([self.bos_id] if bos else []) + tokens + ([self.eos_id] if eos else [])

    def decode(self, t: list[int]) -> str:
        return self.sp_model.decode(t)


def train_tokenizer(sentences: Iterable[str], model_prefix: str, vocab_size: int) -> str:
    """Train a SentencePiece model with Llama 2's settings; return the .model path.

    BPE with byte fallback (no unknown characters), digits split one by one, text kept exactly
    as written (identity normalisation, spaces preserved) behind a dummy leading space.
    """
    SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.99995,
        max_sentencepiece_length=16,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
    )
    return model_prefix + ".model"
