"""Decoding: prefill the prompts, then sample and feed back one token per sequence per step.

Each prompt becomes a `Sequence`, the one place that decides when it is finished (EOS, its token
budget, a stop string). A `Decoder` runs sequences through a model and its KV cache, one cache
row per sequence, and keeps a `CacheRows` record of the token ids each row holds, so that a prompt
continuing what a row holds (the next turn of a chat) runs only its new tokens. Sequences need not
start together: every row decodes at its own position.
"""

import itertools
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Literal

import torch

from llama.model import Transformer
from llama.sampling import SamplingParams, SequenceSampler, sample_rows
from llama.streaming import TextStream
from llama.tokenizer import Tokenizer

FinishReason = Literal["stop", "length"]  # "stop": EOS or a stop string; "length": the token budget


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under logits (..., vocab) for tokens (...)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def decode_step(model: Transformer, tokens: torch.Tensor, start_pos: int | list[int]) -> torch.Tensor:
    """Logits (batch, vocab) after feeding one token (batch,) per sequence at start_pos."""
    return model.logits(model.hidden_states(tokens.unsqueeze(1), start_pos)[:, -1])


def check_max_gen_len(max_gen_len: int) -> None:
    if not isinstance(max_gen_len, int) or isinstance(max_gen_len, bool):
        raise TypeError(f"max_gen_len must be a whole number of tokens, got {max_gen_len!r}")
    if max_gen_len < 0:
        raise ValueError(f"max_gen_len must be >= 0, got {max_gen_len}")


def check_prompts(prompt_tokens: list[list[int]], max_batch_size: int, max_seq_len: int, vocab_size: int) -> None:
    """Reject batches the pre-allocated cache cannot hold, and ids the model has no embedding for."""
    if not isinstance(prompt_tokens, list | tuple) or not all(isinstance(t, list | tuple) for t in prompt_tokens):
        raise TypeError("prompt_tokens must be a list of prompts, each a list of token ids: e.g. [[1, 450, 7483]]")
    if len(prompt_tokens) == 0:
        raise ValueError("no prompts given: pass at least one prompt")
    if len(prompt_tokens) > max_batch_size:
        raise ValueError(
            f"{len(prompt_tokens)} prompts exceed max_batch_size={max_batch_size}: "
            "build with a larger max_batch_size or send the prompts in smaller batches"
        )
    for i, tokens in enumerate(prompt_tokens):
        if len(tokens) == 0:
            raise ValueError(f"prompt {i} has no tokens: every prompt needs at least one (usually BOS)")
        if len(tokens) > max_seq_len:
            raise ValueError(
                f"prompt {i} is {len(tokens)} tokens long but max_seq_len is {max_seq_len}: "
                "shorten the prompt or build with a larger max_seq_len"
            )
        bad = next(
            (t for t in tokens if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size), None
        )
        if bad is not None:
            raise ValueError(
                f"prompt {i} holds {bad!r}, which is not a token id of this model's vocabulary (integers 0 to "
                f"{vocab_size - 1}): encode text with the model's own tokenizer"
            )


def check_finite(logits: torch.Tensor) -> torch.Tensor:
    """Logits a model with sound weights gives; NaN or infinite ones would be sampled as nonsense."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(
            "the model's logits are NaN or infinite: its weights may be corrupt (check them with "
            "python -m llama.verify CKPT_DIR), or fp16 overflowed (use --dtype bfloat16 or float32)"
        )
    return logits


class Sequence:
    """One prompt and what has been generated for it: tokens, logprobs and, if streamed, text.

    `add` takes each sampled token and decides whether the sequence is finished: at EOS (which is
    not kept), at a stop string (the text is cut before it) or when its budget of tokens is spent.
    """

    def __init__(
        self,
        prompt: list[int],
        budget: int,
        eos_id: int,
        sampler: SequenceSampler,
        stream: TextStream | None = None,
        alternatives: int = 0,
    ):
        self.prompt, self.budget, self.eos_id, self.sampler, self.stream = list(prompt), budget, eos_id, sampler, stream
        self.alternatives = alternatives  # how many of the most likely tokens to record at each step
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []  # the alternatives, most likely first
        self.prompt_logprobs: list[float] = []  # filled by a prefill that computes logprobs
        self.finish_reason: FinishReason | None = None
        self.text = ""  # streamed text not yet taken
        if budget == 0:
            self.finish("length")

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int, logprob: float | None = None, top: list[tuple[int, float]] | None = None) -> None:
        if token == self.eos_id:
            self.finish("stop")
            return
        self.tokens.append(token)
        self.sampler.took(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if top is not None:
            self.top_logprobs.append(top)
        if self.stream is not None:
            self.text += self.stream.push(token)
            if self.stream.stopped:
                self.finish("stop")
        if not self.finished and len(self.tokens) == self.budget:
            self.finish("length")

    def finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        if self.stream is not None:
            self.text += self.stream.finish()

    def take_text(self) -> str:
        """The text that arrived since the last call: whole characters, cut before any stop string."""
        text, self.text = self.text, ""
        return text


def take(sequences: list[Sequence | None], logits: torch.Tensor, logprobs: bool = False) -> list[int]:
    """Sample a token for each unfinished sequence from its row of logits, and give it to it.

    Returns every row's token (filler for the rows of finished sequences, or None ones). Logprobs
    are recorded with logprobs, or for sequences that want their most likely alternatives.
    """
    live = [s if s is not None and not s.finished else None for s in sequences]
    tokens = sample_rows(logits, [s.sampler if s is not None else None for s in live])
    alternatives = max((s.alternatives for s in live if s is not None), default=0)
    chosen, top = [None] * len(tokens), [None] * len(tokens)
    if logprobs or alternatives:
        scores = torch.log_softmax(logits.float(), dim=-1)
        chosen = scores.gather(-1, torch.tensor(tokens, device=logits.device).unsqueeze(-1)).squeeze(-1).tolist()
        if alternatives:
            values, ids = (t.tolist() for t in scores.topk(alternatives, dim=-1))
            top = [list(zip(i, v)) for i, v in zip(ids, values)]
    for row, sequence in enumerate(live):
        if sequence is not None:
            alternatives_here = top[row][: sequence.alternatives] if sequence.alternatives else None
            sequence.add(tokens[row], chosen[row], alternatives_here)
    return tokens


class CacheRows:
    """The token ids whose keys and values each KV-cache row holds, from position 0.

    Forgotten before a pass writes into a row and recorded after it, so the record never claims
    more than the row holds, even if the pass fails half-way.
    """

    def __init__(self, rows: int):
        self.tokens: list[list[int]] = [[] for _ in range(rows)]

    def reusable(self, row: int, prompt: list[int]) -> int:
        """How many leading tokens of a prompt the row holds already, leaving at least one to run.

        Compared by id: the cache holds the ids the model generated, and re-encoding their text
        (as the chat format does for past answers) may split it into different tokens.
        """
        shared = 0
        for cached, token in zip(self.tokens[row], prompt):
            if cached != token:
                break
            shared += 1
        return min(shared, len(prompt) - 1)

    def forget_from(self, row: int, position: int) -> None:
        del self.tokens[row][position:]

    def append(self, row: int, tokens: list[int]) -> None:
        self.tokens[row] += tokens


Step = Callable[[Transformer, torch.Tensor, int | list[int]], torch.Tensor]


class Decoder:
    """Generation with one model and its KV cache: sequence i of a call occupies cache row i."""

    def __init__(self, model: Transformer, step: Step = decode_step):
        self.model, self.step = model, step
        self.device = model.tok_embeddings.weight.device
        self.rows = CacheRows(model.params.max_batch_size)

    def sequences(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        tokenizer: Tokenizer,
        sampling: SamplingParams,
        stop: list[str] | None = None,
    ) -> list[Sequence]:
        """Check the prompts; one Sequence each, allowed max_gen_len new tokens or what the window leaves.

        With stop (a list, maybe empty), each sequence also streams its text, cut before those strings.
        With a seed, sequence i draws from a generator seeded with seed + i.
        """
        params = self.model.params
        check_prompts(prompt_tokens, params.max_batch_size, params.max_seq_len, params.vocab_size)
        check_max_gen_len(max_gen_len)
        sequences = []
        for i, tokens in enumerate(prompt_tokens):
            own = sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i)
            sampler = SequenceSampler(own, tokens, params.vocab_size, self.device)
            budget = min(len(tokens) + max_gen_len, params.max_seq_len) - len(tokens)
            stream = None if stop is None else TextStream(tokenizer, stop)
            sequences.append(Sequence(tokens, budget, tokenizer.eos_id, sampler, stream))
        return sequences

    def prefill(self, sequences: list[Sequence], logprobs: bool, reuse: bool) -> torch.Tensor:
        """Run all prompts through the model at once; return the logits of each one's next token.

        Padding sits after each prompt, where causal attention keeps it from touching the real
        tokens; decoding then overwrites those cache positions. A token's logprob is taken from the
        logits one position earlier, so the first prompt token, with nothing before it, gets 0.
        With reuse (one prompt, no logprobs) the part of the prompt that cache row 0 holds already
        is not run again: the rest runs from the position where it starts.
        """
        start = self.rows.reusable(0, sequences[0].prompt) if reuse else 0
        prompts = [sequence.prompt[start:] for sequence in sequences]
        bsz, longest = len(prompts), max(len(p) for p in prompts)
        tokens = torch.zeros((bsz, longest), dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            self.rows.forget_from(row, start)
        h = self.model.hidden_states(tokens, start)
        for row, prompt in enumerate(prompts):
            self.rows.append(row, prompt)
        rows = torch.arange(bsz, device=self.device)
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        if not logprobs:
            return check_finite(self.model.logits(h[rows, last]))
        logits = self.model.logits(h)
        prompt_logprobs = torch.zeros((bsz, longest), device=self.device)
        prompt_logprobs[:, 1:] = token_logprobs(logits[:, :-1], tokens[:, 1:])
        for sequence, values in zip(sequences, prompt_logprobs.tolist()):
            sequence.prompt_logprobs = values[: len(sequence.prompt)]
        return check_finite(logits[rows, last])

    @torch.inference_mode()
    def run(self, sequences: list[Sequence], logprobs: bool = False, reuse: bool = False) -> Iterator[list[str]]:
        """Prefill, then give every unfinished sequence a sampled token and feed the tokens back,
        until all are finished.

        Yields once per step, after the sequences have taken their tokens and before the tokens are
        fed back, each sequence's new text (streamed sequences only; "" for the others): a consumer
        sees each token as soon as it exists, and one that stops reading costs no further forward
        pass. A finished sequence keeps stepping in lockstep, at an in-range position beyond what
        its row holds; what it is fed is filler.
        """
        next_logits = self.prefill(sequences, logprobs, reuse)
        max_seq_len = self.model.params.max_seq_len
        for step in itertools.count():
            if all(sequence.finished for sequence in sequences):
                return
            live = [not sequence.finished for sequence in sequences]
            tokens = take(sequences, next_logits, logprobs)
            yield [sequence.take_text() for sequence in sequences]
            if all(sequence.finished for sequence in sequences):
                return
            positions = [min(len(sequence.prompt) + step, max_seq_len - 1) for sequence in sequences]
            start_pos = positions[0] if len(set(positions)) == 1 else positions
            next_logits = self.step(self.model, torch.tensor(tokens, device=self.device), start_pos)
            for row, running in enumerate(live):
                if running:  # fed at the position right after what the row holds
                    self.rows.append(row, [tokens[row]])
