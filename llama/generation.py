"""The `Llama` API: load a model, complete text, answer dialogs, streamed or not."""

import itertools
import time
from collections.abc import Iterator
from typing import Any, TypedDict

import torch

from llama.chat_format import (
    UNSAFE_ERROR,
    Dialog,
    Message,
    encode_dialog,
    refused_dialogs,
    stream_with_refusals,
    with_refusals,
)
from llama.compile import compile_decode_step
from llama.decoding import Decoder, decode_step
from llama.loading import find_tokenizer, load_model
from llama.model import Transformer
from llama.runtime import choose_runtime, init_model_parallel, is_main_process
from llama.sampling import sampling_params
from llama.streaming import check_stop, join_deltas
from llama.tokenizer import Tokenizer

__all__ = ["ChatPrediction", "CompletionPrediction", "Dialog", "Llama", "Message"]


class CompletionPrediction(TypedDict, total=False):
    generation: str
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


class ChatPrediction(TypedDict, total=False):
    generation: Message
    tokens: list[str]  # not required
    logprobs: list[float]  # not required


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str,
        tokenizer_path: str | None,
        max_seq_len: int,
        max_batch_size: int,
        model_parallel_size: int | None = None,
        seed: int = 1,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        compile: bool = False,
        verify: bool = False,
        quantize: str | None = None,
    ) -> "Llama":
        """Load a checkpoint folder (Meta's shards or Hugging Face's safetensors) and its tokenizer.

        Any shard count runs on any number of processes. tokenizer_path None means the
        tokenizer.model in ckpt_dir or its parent (where download.sh puts it).
        device and dtype default to CUDA in bf16/fp16 when a GPU is present, else CPU in fp32.
        Every rank must use the same seed so that sampling picks the same tokens everywhere.
        compile runs the decode step through torch.compile (see llama.compile); verify checks the
        files against checklist.chk first; quantize ("int8", "int4", "int4:g32") stores the linear
        weights as integers, quantized as they are read (see llama.quantization).
        """
        for name, value in (("max_seq_len", max_seq_len), ("max_batch_size", max_batch_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an integer (the same on every rank), got {seed!r}")
        # The group first: a process that fails below then ends its connections, and its peers notice at once.
        runtime = choose_runtime(device, dtype)
        init_model_parallel(runtime, model_parallel_size)
        tokenizer = Tokenizer(str(find_tokenizer(ckpt_dir, tokenizer_path)))
        torch.manual_seed(seed)

        start_time = time.time()
        model = load_model(ckpt_dir, tokenizer, runtime, max_seq_len, max_batch_size, verify=verify, quantize=quantize)
        if is_main_process():
            print(f"Loaded in {time.time() - start_time:.2f} seconds")
        return Llama(model, tokenizer, compile)

    def __init__(self, model: Transformer, tokenizer: Tokenizer, compile: bool = False):
        """model must have its KV cache set up (Transformer.setup_caches); compile: see llama.compile."""
        self.model = model
        self.tokenizer = tokenizer
        self._decoder = Decoder(model, compile_decode_step(decode_step) if compile else decode_step)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
        **sampling: Any,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Continue each prompt until EOS, max_gen_len new tokens, or max_seq_len.

        Each prompt is prefilled whole in one batched forward pass (right-padded), then every
        sequence decodes at its own position, so prompts of different lengths cost no extra passes.
        With logprobs, each token's log-probability given the tokens before it (0 for the first).
        Further sampling options (top_k, min_p, presence_penalty, frequency_penalty,
        repetition_penalty, logit_bias, seed) are llama.sampling.SamplingParams'; every method
        that generates takes them.
        """
        params = sampling_params(temperature, top_p, sampling)
        sequences = self._decoder.sequences(prompt_tokens, max_gen_len, self.tokenizer, params)
        for _ in self._decoder.run(sequences, logprobs):
            pass
        tokens = [(s.prompt if echo else []) + s.tokens for s in sequences]
        if not logprobs:
            return tokens, None
        return tokens, [(s.prompt_logprobs if echo else []) + s.logprobs for s in sequences]

    def generate_stream(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        stop: str | list[str] | None = None,
        reuse_cache: bool = False,
        **sampling: Any,
    ) -> Iterator[list[str]]:
        """generate, as text: after each step, yield the new text of every sequence ("" where there is none).

        A sequence's deltas add up to tokenizer.decode(its generated tokens), cut before the earliest
        of the stop strings; a sequence that reaches one finishes as at EOS. With reuse_cache (one
        prompt), the part of the prompt that the cache still holds from the last call is not run again.
        The arguments are checked here, before the first step.
        """
        params = sampling_params(temperature, top_p, sampling)
        sequences = self._decoder.sequences(prompt_tokens, max_gen_len, self.tokenizer, params, check_stop(stop))
        if reuse_cache and len(sequences) != 1:
            raise ValueError(f"reuse_cache works with one prompt at a time, got {len(sequences)}")
        return self._decoder.run(sequences, reuse=reuse_cache)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> list[CompletionPrediction]:
        """Complete each prompt; by default generate until EOS or the end of the context window.

        With stop strings, each completion also ends before the first of them that it produces. A stop
        string may end inside a token, so it cannot be combined with the per-token logprobs or echo.
        """
        if check_stop(stop):
            if logprobs or echo:
                raise ValueError("stop strings cannot be combined with logprobs or echo: drop one or the other")
            stream = self.text_completion_stream(prompts, temperature, top_p, max_gen_len, stop, **sampling)
            return [{"generation": text} for text in join_deltas(stream, len(prompts))]
        prompt_tokens = _encode_prompts(self.tokenizer, prompts)
        tokens, token_logprobs = self.generate(
            prompt_tokens, _max_gen_len(self.model, max_gen_len), temperature, top_p, logprobs, echo, **sampling
        )
        return [
            _prediction(self.tokenizer, self.tokenizer.decode(t), t, lp)
            for t, lp in zip(tokens, token_logprobs or _none())
        ]

    def text_completion_stream(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> Iterator[list[str]]:
        """text_completion as it is generated: after each step, a list with each prompt's new text.

        Each prompt's deltas add up to its text_completion "generation" for the same arguments (and seed).
        """
        prompt_tokens = _encode_prompts(self.tokenizer, prompts)
        max_gen_len = _max_gen_len(self.model, max_gen_len)
        return self.generate_stream(prompt_tokens, max_gen_len, temperature, top_p, stop, **sampling)

    def chat_completion(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        **sampling: Any,
    ) -> list[ChatPrediction]:
        """Answer the last user message of each dialog in the Llama 2 chat format.

        Dialogs that smuggle in the format's own tags are answered with UNSAFE_ERROR without being
        run through the model.
        """
        refused, prompt_tokens = _chat_prompts(self.tokenizer, dialogs)
        answers, answer_logprobs = [], None
        if prompt_tokens:
            answers, answer_logprobs = self.generate(
                prompt_tokens, _max_gen_len(self.model, max_gen_len), temperature, top_p, logprobs, **sampling
            )
        predictions = [
            _prediction(self.tokenizer, _assistant(self.tokenizer.decode(t)), t, lp)
            for t, lp in zip(answers, answer_logprobs or _none())
        ]
        refusal = [] if logprobs else None
        return with_refusals(
            refused, predictions, lambda: _prediction(self.tokenizer, _assistant(UNSAFE_ERROR), [], refusal)
        )

    def chat_completion_stream(
        self,
        dialogs: list[Dialog],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        **sampling: Any,
    ) -> Iterator[list[str]]:
        """chat_completion as it is generated: after each step, a list with each answer's new text.

        Each dialog's deltas add up to its chat_completion answer; a refused dialog's answer
        (UNSAFE_ERROR) comes whole in the first step.
        """
        refused, prompt_tokens = _chat_prompts(self.tokenizer, dialogs)
        answers = iter([])
        if prompt_tokens:
            max_gen_len = _max_gen_len(self.model, max_gen_len)
            answers = self.generate_stream(prompt_tokens, max_gen_len, temperature, top_p, **sampling)
        return stream_with_refusals(refused, answers)


def _encode_prompts(tokenizer: Tokenizer, prompts: list[str]) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, list | tuple):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}: pass [prompt] for one")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompt {i} is a {type(prompt).__name__}, not a string")
    return [tokenizer.encode(x, bos=True, eos=False) for x in prompts]


def _chat_prompts(tokenizer: Tokenizer, dialogs: list[Dialog]) -> tuple[list[bool], list[list[int]]]:
    """Which dialogs are refused, and the token ids of the others."""
    refused = refused_dialogs(dialogs)
    return refused, [encode_dialog(tokenizer, d) for d, r in zip(dialogs, refused) if not r]


def _prediction(tokenizer: Tokenizer, generation, tokens: list[int], logprobs: list[float] | None) -> dict:
    """The reference's result for one sequence; with logprobs, also each token's text and logprob."""
    if logprobs is None:
        return {"generation": generation}
    return {"generation": generation, "tokens": [tokenizer.decode(t) for t in tokens], "logprobs": logprobs}


def _max_gen_len(model: Transformer, max_gen_len: int | None) -> int:
    """None means: until EOS or the end of the context window, as in the reference."""
    return model.params.max_seq_len - 1 if max_gen_len is None else max_gen_len


def _assistant(content: str) -> Message:
    return {"role": "assistant", "content": content}


def _none() -> Iterator[None]:
    return itertools.repeat(None)
