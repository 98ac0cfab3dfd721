"""Continuous batching: many sequences share the KV cache, each joining and leaving at its own time.

Each row of the KV cache is a slot. Every step, the engine admits waiting jobs into free slots
(the slot whose cached tokens share the longest prefix with the prompt, so that only the rest is
prefilled), prefills at most `prefill_chunk` prompt tokens (a long prompt takes several steps, so
the sequences already generating are not stalled for its whole length), then decodes one token
for every generating sequence at its own position, with its own sampling options and stop
strings. A finished or cancelled sequence frees its slot at once.

The engine's state changes only through `Plan`s. Under torchrun, rank 0 makes each step's plan
(`plan`) and sends it to every rank, and every rank carries it out (`apply`), so all compute the
same tokens; only rank 0 hands the results out. `serve` and `follow` are those two loops.
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from llama.decoding import CacheRows, Sequence, Step, check_finite, decode_step, take, token_logprobs
from llama.model import Transformer
from llama.sampling import SamplingParams, SequenceSampler
from llama.streaming import TextStream
from llama.tokenizer import Tokenizer


@dataclass
class Job:
    """One sequence to generate: what a client asked for, checked and tokenized."""

    id: int
    prompt: list[int]
    budget: int  # tokens it may generate
    sampling: SamplingParams
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False  # report each generated token's logprob
    alternatives: int = 0  # and how many of the most likely tokens at each step
    prompt_logprobs: bool = False  # report each prompt token's logprob too (so none of it is reused)
    ignore_eos: bool = False  # generate the whole budget (benchmarks)


@dataclass
class Plan:
    """What every rank does this step: jobs to start (each with its slot and the prefix it reuses)."""

    admit: list[tuple[Job, int, int]] = field(default_factory=list)
    cancel: list[int] = field(default_factory=list)
    stop: bool = False  # the server is shutting down


@dataclass
class Event:
    """What a sequence produced in one step; finish_reason is set on its last event."""

    id: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] | None = None  # on the first event, if the job asked
    finish_reason: str | None = None
    error: str | None = None


class Active:
    """A job in its slot: how far its prompt is in the cache, and what has been handed out."""

    def __init__(self, job: Job, sequence: Sequence, prefilled: int):
        self.job, self.sequence, self.prefilled = job, sequence, prefilled
        self.reported = 0  # tokens already in events
        self.prompt_logprobs: list[float | None] = [None]  # nothing comes before the first token

    @property
    def generating(self) -> bool:
        return self.prefilled == len(self.job.prompt) and not self.sequence.finished

    def event(self) -> Event:
        sequence, start = self.sequence, self.reported
        self.reported = len(sequence.tokens)
        return Event(
            self.job.id,
            sequence.take_text(),
            sequence.tokens[start:],
            sequence.logprobs[start:],
            sequence.top_logprobs[start:],
            finish_reason=sequence.finish_reason,
        )


class Engine:
    """The slots of one model's KV cache, and the steps that fill them."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        step: Step = decode_step,
        prefill_chunk: int = 256,
        batch_sizes: list[int] | None = None,
    ):
        """batch_sizes: the only batch sizes the decode step runs at (the smallest that holds the rows
        in use): a compiled step is compiled once per batch size, so a few sizes, compiled up front by
        warm_up, beat many compiled as they first occur. None: the exact number of rows."""
        self.model, self.tokenizer, self.step, self.prefill_chunk = model, tokenizer, step, prefill_chunk
        self.batch_sizes = sorted(batch_sizes or range(1, model.params.max_batch_size + 1))
        self.device = model.tok_embeddings.weight.device
        self.rows = CacheRows(model.params.max_batch_size)
        self.slots: list[Active | None] = [None] * model.params.max_batch_size
        self.reused_tokens = 0  # prompt tokens that were in a slot already, and so not prefilled

    @property
    def busy(self) -> int:
        return sum(slot is not None for slot in self.slots)

    def plan(self, waiting: list[Job], cancelled: set[int]) -> Plan:
        """Rank 0's choice for the next step: cancel what clients left, start what fits in free slots."""
        plan = Plan(cancel=[slot.job.id for slot in self.slots if slot is not None and slot.job.id in cancelled])
        free = [row for row, slot in enumerate(self.slots) if slot is None or slot.job.id in cancelled]
        for job in waiting[: len(free)]:

            def reuse(row: int, job: Job = job) -> int:
                return 0 if job.prompt_logprobs else self.rows.reusable(row, job.prompt)

            row = max(free, key=lambda r: (reuse(r), -r))  # the longest cached prefix, then the lowest row
            free.remove(row)
            plan.admit.append((job, row, reuse(row)))
        return plan

    @torch.inference_mode()
    def apply(self, plan: Plan) -> list[Event]:
        """Carry out a plan and one step of work; return what each sequence produced."""
        for row, slot in enumerate(self.slots):
            if slot is not None and slot.job.id in plan.cancel:
                self.slots[row] = None
        for job, row, reuse in plan.admit:
            sampler = SequenceSampler(job.sampling, job.prompt, self.model.params.vocab_size, self.device)
            stream = TextStream(self.tokenizer, job.stop)
            eos_id = -1 if job.ignore_eos else self.tokenizer.eos_id
            sequence = Sequence(job.prompt, job.budget, eos_id, sampler, stream, job.alternatives)
            self.rows.forget_from(row, reuse)
            self.slots[row] = Active(job, sequence, reuse)
            self.reused_tokens += reuse
        events = self.prefill()
        events += self.decode()
        for row, slot in enumerate(self.slots):
            if slot is not None and slot.sequence.finished:
                self.slots[row] = None
        return events

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run the decode step once at every batch size, so that compiling happens now."""
        last = self.model.params.max_seq_len - 1
        for size in self.batch_sizes:
            # Filler, past what each row holds, at positions of 2 or more: torch compiles a position
            # of 0 or 1 as a special case, and the first real step would compile again.
            positions = [min(len(self.rows.tokens[row]) + 2, last) for row in range(size)]
            self.step(self.model, torch.zeros(size, dtype=torch.long, device=self.device), positions)

    def prefill(self) -> list[Event]:
        """Up to prefill_chunk prompt tokens, oldest job first; a prompt done gets its first token."""
        events, room = [], self.prefill_chunk
        waiting = sorted((slot.job.id, row) for row, slot in enumerate(self.slots) if slot and not slot.generating)
        for _, row in waiting:
            slot = self.slots[row]
            if room == 0:
                break
            prompt, start = slot.job.prompt, slot.prefilled
            chunk = prompt[start : start + room]
            tokens = torch.tensor([chunk], device=self.device)
            h = self.model.hidden_states(tokens, start, first_row=row)
            self.rows.append(row, chunk)
            slot.prefilled += len(chunk)
            room -= len(chunk)
            if slot.job.prompt_logprobs:
                logits = self.model.logits(h)[0]
                following = prompt[start + 1 : start + len(chunk) + 1]
                scores = token_logprobs(logits[: len(following)], torch.tensor(following, device=self.device))
                slot.prompt_logprobs += scores.tolist()
            if slot.prefilled == len(prompt):
                last = check_finite(self.model.logits(h[:, -1]))
                take([slot.sequence], last, logprobs=slot.job.logprobs)
                event = slot.event()
                if slot.job.prompt_logprobs:
                    event.prompt_logprobs = slot.prompt_logprobs
                events.append(event)
        return events

    def decode(self) -> list[Event]:
        """One token for every generating sequence, all rows below the highest one stepping together."""
        generating = [row for row, slot in enumerate(self.slots) if slot is not None and slot.generating]
        if not generating:
            return []
        rows = range(next(size for size in self.batch_sizes if size > generating[-1]))
        max_seq_len = self.model.params.max_seq_len
        tokens, positions = [], []
        for row in rows:
            slot = self.slots[row]
            if row in generating:
                tokens.append(slot.sequence.tokens[-1])
                positions.append(len(self.rows.tokens[row]))
            else:  # filler, written just past what the row holds (the last position if it is full)
                if len(self.rows.tokens[row]) == max_seq_len:
                    self.rows.forget_from(row, max_seq_len - 1)
                tokens.append(0)
                positions.append(len(self.rows.tokens[row]))
        logits = self.step(self.model, torch.tensor(tokens, device=self.device), positions)
        for row in generating:
            self.rows.append(row, [tokens[row]])
        live = [self.slots[row] if row in generating else None for row in rows]
        take(
            [slot.sequence if slot else None for slot in live], logits, any(slot and slot.job.logprobs for slot in live)
        )
        return [slot.event() for slot in live if slot is not None]


class Inbox:
    """Rank 0's side of the engine thread: jobs waiting for a slot and jobs whose client left,
    from any thread. A job waits here until the engine admits it, so the queue's length is what
    --max_queue bounds, however often the engine thread looks."""

    def __init__(self, bound: int):
        self.bound = bound
        self.waiting: list[Job] = []
        self.cancelled: set[int] = set()
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = False

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 429)."""
        with self.lock:
            if len(self.waiting) >= self.bound:
                return False
            self.waiting.append(job)
        self.wake.set()
        return True

    def cancel(self, job_id: int) -> None:
        with self.lock:
            self.cancelled.add(job_id)
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()

    def take(self) -> tuple[list[Job], set[int]]:
        """The jobs still waiting, and the jobs cancelled since the last call (dropped from the queue)."""
        with self.lock:
            cancelled, self.cancelled = self.cancelled, set()
            self.waiting = [job for job in self.waiting if job.id not in cancelled]
            return list(self.waiting), cancelled

    def admitted(self, ids: set[int]) -> None:
        """These jobs have a slot now: room for as many more."""
        with self.lock:
            self.waiting = [job for job in self.waiting if job.id not in ids]


def serve(engine: Engine, inbox: Inbox, deliver: Callable[[Event], None], group: dist.ProcessGroup | None) -> None:
    """Rank 0's loop: plan each step from the inbox, send the plan to the other ranks, run it, deliver."""
    while True:
        if not inbox.waiting and engine.busy == 0 and not inbox.stopping:
            inbox.wake.wait()
        inbox.wake.clear()
        waiting, cancelled = inbox.take()
        plan = Plan(stop=True) if inbox.stopping else engine.plan(waiting, cancelled)
        if group is not None:
            dist.broadcast_object_list([plan], src=0, group=group)
        if plan.stop:
            return
        inbox.admitted({job.id for job, _, _ in plan.admit})
        try:
            events = engine.apply(plan)
        except Exception as err:  # noqa: BLE001 - one bad step fails its requests, not the server
            events = [Event(slot.job.id, error=str(err), finish_reason="error") for slot in engine.slots if slot]
            engine.slots = [None] * len(engine.slots)
        for event in events:
            deliver(event)


def follow(engine: Engine, group: dist.ProcessGroup) -> None:
    """Every other rank's loop: run each plan rank 0 sends, until it says stop."""
    while True:
        received: list[Plan | None] = [None]
        dist.broadcast_object_list(received, src=0, group=group)
        plan = received[0]
        if plan.stop:
            return
        try:
            engine.apply(plan)
        except Exception:  # noqa: BLE001 - rank 0 meets the same error and reports it
            engine.slots = [None] * len(engine.slots)
