"""The server's state between HTTP and the engine thread: jobs made from requests, their events
back to the waiting coroutines, and what /metrics reports."""

import asyncio
import itertools
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import torch.distributed as dist
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.requests import Request

from llama.compile import compile_decode_step
from llama.decoding import decode_step
from llama.engine import Engine, Event, Inbox, Job, serve
from llama.generation import Llama
from llama.openai_api import ChatRequest, CompletionRequest, TokenText, error_body
from llama.streaming import check_stop


class Refused(Exception):
    """A request this server will not run: an HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.body = status, error_body(message, kind, param)


class Metrics:
    """What /metrics reports, in Prometheus's text format."""

    def __init__(self, queue_depth: Callable[[], int], busy_slots: Callable[[], int], reused_tokens: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.requests = Counter("llama_requests", "Requests answered", ["endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("llama_prompt_tokens", "Prompt tokens of requests run", registry=self.registry)
        self.generated_tokens = Counter("llama_generated_tokens", "Tokens generated", registry=self.registry)
        self.cancelled = Counter("llama_cancelled", "Sequences cancelled: their client left", registry=self.registry)
        self.first_token = Histogram(
            "llama_time_to_first_token_seconds", "From a request's arrival to its first token", registry=self.registry
        )
        Gauge("llama_queue_depth", "Sequences waiting for a slot", registry=self.registry).set_function(queue_depth)
        Gauge("llama_busy_slots", "KV-cache slots in use", registry=self.registry).set_function(busy_slots)
        reused = Gauge(
            "llama_prompt_tokens_reused", "Prompt tokens found in a slot, not prefilled", registry=self.registry
        )
        reused.set_function(reused_tokens)
        rate = Gauge("llama_tokens_per_second", "Tokens generated per second, last 10 s", registry=self.registry)
        rate.set_function(self.tokens_per_second)
        self.recent: deque[tuple[float, int]] = deque()

    def generated(self, count: int) -> None:
        self.generated_tokens.inc(count)
        self.recent.append((time.monotonic(), count))

    def tokens_per_second(self) -> float:
        horizon = time.monotonic() - 10
        while self.recent and self.recent[0][0] < horizon:
            self.recent.popleft()
        return sum(count for _, count in self.recent) / 10


class Server:
    """The model behind the HTTP side: its engine thread, and the requests waiting on it."""

    def __init__(self, settings: dict, max_queue: int):
        self.settings = settings
        self.state, self.failure = "loading", ""
        self.inbox = Inbox(max_queue)
        self.engine: Engine | None = None
        self.ids = itertools.count()
        self.waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.lock = threading.Lock()
        self.metrics = Metrics(
            lambda: len(self.inbox.waiting),
            lambda: self.engine.busy if self.engine else 0,
            lambda: self.engine.reused_tokens if self.engine else 0,
        )

    def run(self, build: Callable[[], tuple[Llama, dist.ProcessGroup | None]]) -> None:
        """The engine thread: load the model, then step the engine until the server stops."""
        try:
            generator, group = build()
            self.tokenizer, self.args = generator.tokenizer, generator.model.params
            self.token_text = TokenText(generator.tokenizer)
            self.engine = new_engine(generator, self.settings["compile"], self.settings["prefill_chunk"])
            self.state = "ready"
            serve(self.engine, self.inbox, self.deliver, group)
        except Exception as err:  # noqa: BLE001 - said on /health and to every waiting client
            self.state, self.failure = "failed", str(err)
            print(f"error: the engine stopped: {err}", file=sys.stderr, flush=True)
            for job_id in list(self.waiters):
                self.deliver(Event(job_id, finish_reason="error", error=f"the engine stopped: {err}"))

    def deliver(self, event: Event) -> None:
        """From the engine thread to the request's coroutine."""
        with self.lock:
            waiter = self.waiters.get(event.id)
        if waiter is not None:
            loop, queue = waiter
            loop.call_soon_threadsafe(queue.put_nowait, event)

    def check_ready(self) -> None:
        if self.state == "loading":
            raise Refused(503, "the model is still loading: try again in a moment", kind="service_unavailable")
        if self.state == "failed":
            raise Refused(503, f"the model's engine stopped: {self.failure}", kind="service_unavailable")

    def jobs(self, prompt: list[int], request: ChatRequest | CompletionRequest, count: int) -> list[Job]:
        """count jobs for one prompt; a seeded request's choice i draws with seed + i."""
        limit = request.token_limit
        window = self.args.max_seq_len
        if len(prompt) >= window:
            where = "messages" if isinstance(request, ChatRequest) else "prompt"
            raise Refused(400, f"the prompt is {len(prompt)} tokens, but the context window is {window}", where)
        budget = window - len(prompt) if limit is None else limit
        if len(prompt) + budget > window:
            raise Refused(
                400,
                f"the prompt ({len(prompt)} tokens) and max_tokens ({budget}) together exceed the context window of "
                f"{window} tokens: ask for at most {window - len(prompt)} tokens or shorten the prompt",
                "max_tokens",
            )
        try:
            sampling = request.sampling(self.settings["temperature"], self.settings["top_p"])
            sampling.check_vocabulary(self.args.vocab_size)
            stop = check_stop(request.stop_strings())
        except (ValueError, TypeError) as err:
            raise Refused(400, str(err), str(err).split()[0]) from err
        prompt_logprobs = isinstance(request, CompletionRequest) and request.echo and request.wants_logprobs
        return [
            Job(
                next(self.ids),
                prompt,
                budget,
                sampling if sampling.seed is None else replace(sampling, seed=sampling.seed + i),
                stop,
                request.wants_logprobs,
                request.alternatives,
                prompt_logprobs,
                request.ignore_eos,
            )
            for i in range(count)
        ]


def new_engine(generator: Llama, compile: bool, prefill_chunk: int) -> Engine:
    """The engine for a generator's model; compiled, at batch sizes 1, 2, 4, ... compiled up front."""
    if not compile:
        return Engine(generator.model, generator.tokenizer, decode_step, prefill_chunk)
    most = generator.model.params.max_batch_size
    sizes = sorted({min(2**i, most) for i in range(most.bit_length() + 1)})
    engine = Engine(generator.model, generator.tokenizer, compile_decode_step(decode_step), prefill_chunk, sizes)
    engine.warm_up()
    return engine


class Generation:
    """The jobs of one request, submitted together; their events as they come."""

    def __init__(self, server: Server, jobs: list[Job]):
        self.server, self.jobs = server, jobs
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.open = {job.id for job in jobs}
        self.arrived = time.monotonic()
        loop = asyncio.get_running_loop()
        with server.lock:
            for job in jobs:
                server.waiters[job.id] = (loop, self.queue)
        for job in jobs:
            if not server.inbox.submit(job):
                self.close()
                raise Refused(429, "the server is busy: its queue is full; retry later", kind="rate_limit_exceeded")
        server.metrics.prompt_tokens.inc(sum(len(job.prompt) for job in jobs))

    async def events(self, request: Request) -> AsyncIterator[Event]:
        """Every event until each job has finished; stops (and cancels) if the client goes away."""
        first = True
        while self.open:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if event.error is not None:
                raise Refused(500, event.error, kind="server_error")
            if first and event.tokens:
                self.server.metrics.first_token.observe(time.monotonic() - self.arrived)
                first = False
            self.server.metrics.generated(len(event.tokens))
            if event.finish_reason is not None:
                self.open.discard(event.id)
            yield event

    def close(self) -> None:
        """Cancel what is still running (a client that left) and forget the jobs."""
        for job_id in self.open:
            self.server.inbox.cancel(job_id)
            self.server.metrics.cancelled.inc()
        with self.server.lock:
            for job in self.jobs:
                self.server.waiters.pop(job.id, None)
