"""Continuous batching: results do not depend on company, joining late, chunked prefill or reuse."""

from pathlib import Path

import pytest
from torch._dynamo.utils import counters

from llama import Llama
from llama.engine import Engine, Event, Job, Plan
from llama.sampling import SamplingParams
from llama.serving import new_engine
from tests.helpers import PROMPTS, prompt_ids

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def llama(checkpoint: Path, tokenizer_path: str) -> Llama:
    """A model of its own: the engine and the reference generator write into the same KV cache."""
    return Llama.build(str(checkpoint), tokenizer_path, max_seq_len=64, max_batch_size=4, device="cpu")


def run_all(engine: Engine, jobs: list[Job], start_at: dict[int, int] | None = None) -> dict[int, list[Event]]:
    """Step the engine until every job is done; job i is submitted at step start_at[i] (default 0)."""
    start_at = start_at or {}
    events: dict[int, list[Event]] = {job.id: [] for job in jobs}
    waiting, step = [], 0
    while step == 0 or waiting or engine.busy or any(step <= s for s in start_at.values()):
        waiting += [job for job in jobs if start_at.get(job.id, 0) == step]
        plan = engine.plan(waiting, set())
        admitted = {job.id for job, _, _ in plan.admit}
        waiting = [job for job in waiting if job.id not in admitted]
        for event in engine.apply(plan):
            events[event.id].append(event)
        step += 1
        assert step < 500
    return events


def tokens_of(events: list[Event]) -> list[int]:
    return [token for event in events for token in event.tokens]


def reference(llama: Llama, prompt: list[int], budget: int, **sampling) -> list[int]:
    tokens, _ = llama.generate([prompt], max_gen_len=budget, **{"temperature": 0, **sampling})
    return tokens[0]


def test_a_greedy_sequence_is_the_same_alone_or_in_company(llama: Llama) -> None:
    prompts = prompt_ids(llama.tokenizer)
    expected = [reference(llama, p, 10) for p in prompts]
    engine = Engine(llama.model, llama.tokenizer)
    alone = run_all(engine, [Job(0, prompts[1], 10, GREEDY)])
    assert tokens_of(alone[0]) == expected[1]
    # Four at once, joining at different steps, with slots freed and reused on the way.
    jobs = [Job(i, prompts[i % 3], 10, GREEDY) for i in range(6)]
    together = run_all(engine, jobs, start_at={0: 0, 1: 0, 2: 3, 3: 5, 4: 6, 5: 11})
    for job in jobs:
        assert tokens_of(together[job.id]) == expected[job.id % 3], job.id
        assert together[job.id][-1].finish_reason in ("length", "stop")


def test_a_long_prompt_is_prefilled_in_chunks_while_others_keep_generating(llama: Llama) -> None:
    long_prompt = llama.tokenizer.encode("the cat sat on the mat " * 6, bos=True, eos=False)
    short = prompt_ids(llama.tokenizer)[0]
    engine = Engine(llama.model, llama.tokenizer, prefill_chunk=8)
    events = run_all(engine, [Job(0, short, 16, GREEDY), Job(1, long_prompt, 4, GREEDY)], start_at={1: 2})
    assert tokens_of(events[0]) == reference(llama, short, 16)
    assert tokens_of(events[1]) == reference(llama, long_prompt, 4)
    steps_to_prefill = -(-len(long_prompt) // 8)
    assert steps_to_prefill > 3
    # The short sequence produced a token at every step the long prompt spent being prefilled.
    assert len(events[0]) >= 2 + steps_to_prefill


def test_a_prompt_that_continues_a_slot_reuses_what_it_holds(llama: Llama) -> None:
    engine = Engine(llama.model, llama.tokenizer)
    first = prompt_ids(llama.tokenizer)[1]
    done = run_all(engine, [Job(0, first, 6, GREEDY)])
    follow_up = first + tokens_of(done[0]) + llama.tokenizer.encode(" and the moon", bos=False, eos=False)
    plan = engine.plan([Job(1, follow_up, 5, GREEDY)], set())
    ((job, row, reuse),) = plan.admit
    assert reuse == len(first) + 5  # the prompt and every generated token that was fed back
    events = {1: []}
    for event in engine.apply(plan):
        events[1].append(event)
    while engine.busy:
        events[1] += engine.apply(Plan())
    assert tokens_of(events[1]) == reference(llama, follow_up, 5)


def test_a_cancelled_sequence_frees_its_slot_at_once(llama: Llama) -> None:
    engine = Engine(llama.model, llama.tokenizer)
    prompt = prompt_ids(llama.tokenizer)[0]
    engine.apply(engine.plan([Job(i, prompt, 40, GREEDY) for i in range(4)], set()))
    assert engine.busy == 4
    plan = engine.plan([Job(9, prompt, 3, GREEDY)], {2})
    assert plan.cancel == [2] and [row for _, row, _ in plan.admit] == [2]
    engine.apply(plan)
    assert engine.busy == 4 and engine.slots[2].job.id == 9


def test_stop_strings_budgets_and_logprobs_per_sequence(llama: Llama) -> None:
    prompts = prompt_ids(llama.tokenizer)
    free = llama.text_completion(PROMPTS[:1], max_gen_len=12, temperature=0)[0]["generation"]
    stop = free[4:7]
    engine = Engine(llama.model, llama.tokenizer)
    jobs = [
        Job(0, prompts[0], 12, GREEDY, stop=[stop]),
        Job(1, prompts[1], 3, GREEDY, logprobs=True, alternatives=2, prompt_logprobs=True),
    ]
    events = run_all(engine, jobs)
    assert "".join(e.text for e in events[0]) == free[: free.index(stop)]
    assert events[0][-1].finish_reason == "stop"
    assert len(tokens_of(events[1])) == 3 and events[1][-1].finish_reason == "length"
    expected_tokens, expected_logprobs = llama.generate(
        prompts[1:2], max_gen_len=3, temperature=0, logprobs=True, echo=True
    )
    got = [lp for e in events[1] for lp in e.logprobs]
    assert got == pytest.approx(expected_logprobs[0][len(prompts[1]) :], abs=1e-4)
    prompt_logprobs = events[1][0].prompt_logprobs
    assert prompt_logprobs[0] is None
    assert prompt_logprobs[1:] == pytest.approx(expected_logprobs[0][1 : len(prompts[1])], abs=1e-4)
    top = [t for e in events[1] for t in e.top_logprobs]
    assert all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)
    assert [t[0][0] for t in top] == expected_tokens[0][len(prompts[1]) :]  # greedy: the most likely


def test_a_seeded_sequence_samples_the_same_in_company(llama: Llama) -> None:
    prompts = prompt_ids(llama.tokenizer)
    seeded = SamplingParams(temperature=1.0, top_p=1.0, seed=11)
    engine = Engine(llama.model, llama.tokenizer)
    alone = tokens_of(run_all(engine, [Job(0, prompts[0], 12, seeded)])[0])
    others = [Job(i, prompts[i % 3], 12, SamplingParams(temperature=0.9, seed=i)) for i in range(1, 4)]
    together = run_all(engine, [Job(0, prompts[0], 12, seeded), *others], start_at={0: 2})
    assert tokens_of(together[0]) == alone


def test_a_compiled_engine_compiles_while_warming_up_and_never_after(checkpoint: Path, tokenizer_path: str) -> None:
    """A server's first steps once compiled again (positions 0 and 1 are special to torch, and
    warm-up used them), and after a restart, with Inductor's cache warm, every new order of the
    rows' positions did too, until torch's recompile limit made each step eager. The second engine
    here warms up from the first one's cache, then serves rows further along in either order."""
    llama = Llama.build(str(checkpoint), tokenizer_path, max_seq_len=64, max_batch_size=2, device="cpu")
    _, long, short = prompt_ids(llama.tokenizer)

    def jobs() -> list[Job]:  # row 1 ahead of row 0, then, once job 1 is done, behind it
        return [Job(0, short, 16, GREEDY), Job(1, long, 4, GREEDY), Job(2, short, 4, GREEDY)]

    eager = run_all(Engine(llama.model, llama.tokenizer), jobs(), start_at={2: 6})
    new_engine(llama, compile=True, prefill_chunk=256)
    engine = new_engine(llama, compile=True, prefill_chunk=256)
    compiled = counters["stats"]["unique_graphs"]
    served = run_all(engine, jobs(), start_at={2: 6})
    assert counters["stats"]["unique_graphs"] == compiled
    for job in jobs():
        assert tokens_of(served[job.id]) == tokens_of(eager[job.id]), job.id
