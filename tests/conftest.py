"""Shared fixtures: a tokenizer trained with Llama 2's settings, tiny random checkpoints, a generator."""

import random
from pathlib import Path

import pytest

from llama import kernels
from llama.runtime import choose_runtime, init_model_parallel
from llama.tokenizer import Tokenizer, train_tokenizer
from tests.helpers import GROUPED_QUERY, write_checkpoint

WORDS = "the a cat dog sat on mat sun moon star river tree house blue red green runs jumps sings".split()


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Sentences with words, numbers, punctuation, chat tags and some non-ASCII text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(3, 10))
        lines.append(f"{' '.join(words).capitalize()} {rng.randint(0, 9999)} times.")
    lines += ["[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. ", "Café déjà vu, naïve résumé."] * 20
    return lines


@pytest.fixture(scope="session", autouse=True)
def model_parallel() -> None:
    """One process: a model-parallel group of size 1 on the CPU, as plain `python` gets."""
    init_model_parallel(choose_runtime("cpu"), 1)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels() -> None:
    """llama.kernels built before any test starts a command, so that none compiles them on the way
    (tests/test_kernels.py builds them afresh, in a cache of its own)."""
    kernels.available()


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return train_tokenizer(corpus(), str(tmp_path_factory.mktemp("tokenizer") / "tokenizer"), vocab_size=400)


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path: str) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The grouped-query model in one shard."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "gqa", GROUPED_QUERY, tokenizer.n_words)


@pytest.fixture(scope="session")
def checkpoint_2_shards(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The same weights as `checkpoint`, split for model-parallel size 2."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "gqa-mp2", GROUPED_QUERY, tokenizer.n_words, 2)


@pytest.fixture(scope="session")
def generator(checkpoint: Path, tokenizer_path: str):
    from llama import Llama

    return Llama.build(str(checkpoint), tokenizer_path, max_seq_len=48, max_batch_size=4, device="cpu")


@pytest.fixture(scope="session")
def hugging_face(tmp_path_factory: pytest.TempPathFactory, checkpoint: Path, tokenizer_path: str) -> Path:
    """The weights of `checkpoint` exported as a Hugging Face folder."""
    from llama.convert import to_hugging_face

    folder = tmp_path_factory.mktemp("hf") / "gqa-hf"
    to_hugging_face(checkpoint, folder, tokenizer_path)
    return folder
