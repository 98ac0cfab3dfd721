"""python -m llama.serve, used as applications use it: the official openai client and raw HTTP."""

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from llama import Llama
from llama.chat_format import UNSAFE_ERROR
from tests.helpers import DEMO, DEMO_MP2, ROOT, Served, environment, free_port, started, torchrun
from tools.demo_data import held_out_dialogs

MODEL = "llama-2-demo"
NO_EOS = {"2": -100}  # the demo tokenizer's EOS, banned: answers run to max_tokens
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def server() -> Iterator[Served]:
    with started("--max_batch_size", "8", "--max_seq_len", "256", "--max_queue", "32") as served:
        yield served


@pytest.fixture(scope="module")
def reference() -> Llama:
    return Llama.build(str(DEMO), None, max_seq_len=256, max_batch_size=16, device="cpu")


QUESTIONS = [dialog for dialog, _ in held_out_dialogs(16)]


def chat(served: Served, messages, **options) -> str:
    answer = served.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **options)
    return answer.choices[0].message.content


def test_chat_answers_as_the_library_does_streamed_or_not(server: Served, reference: Llama) -> None:
    expected = reference.chat_completion(QUESTIONS[:3], temperature=0)
    for dialog, answer in zip(QUESTIONS[:3], expected):
        assert chat(server, dialog) == answer["generation"]["content"]
        stream = server.client.chat.completions.create(
            model=MODEL, messages=dialog, temperature=0, stream=True, stream_options={"include_usage": True}
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer["generation"]["content"]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_the_stream_ends_with_done_and_deltas_never_split_a_character(server: Served) -> None:
    body = {"model": MODEL, "prompt": "Café 🙂 世界", "max_tokens": 24, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    texts = [json.loads(line[6:])["choices"][0]["text"] for line in lines[:-1]]
    assert not any("\ufffd" in text for text in texts if text) or "".join(texts).count("\ufffd") == sum(
        t.count("\ufffd") for t in texts
    )
    whole = server.client.completions.create(model=MODEL, prompt="Café 🙂 世界", max_tokens=24, temperature=0)
    assert "".join(texts) == whole.choices[0].text


def test_completions_take_one_prompt_or_several_and_n(server: Served, reference: Llama) -> None:
    prompts = ["I believe the meaning of life is", "Simply put, the theory of relativity states that "]
    expected = [r["generation"] for r in reference.text_completion(prompts, max_gen_len=16, temperature=0)]
    one = server.client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=16, temperature=0)
    assert one.choices[0].text == expected[0]
    both = server.client.completions.create(model=MODEL, prompt=prompts, max_tokens=16, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [expected[0], expected[0], expected[1], expected[1]]
    tokens = [len(reference.tokenizer.encode(p, bos=True, eos=False)) for p in prompts]
    generated = [len(reference.tokenizer.encode(c.text, bos=False, eos=False)) for c in both.choices]
    assert both.usage.prompt_tokens == sum(tokens)
    assert both.usage.completion_tokens >= sum(generated) - 4  # re-encoding text may merge a few tokens
    assert both.usage.total_tokens == both.usage.prompt_tokens + both.usage.completion_tokens


def test_usage_counts_the_tokens_the_model_saw_and_made(server: Served, reference: Llama) -> None:
    from llama.chat_format import encode_dialog

    answer = server.client.chat.completions.create(model=MODEL, messages=QUESTIONS[0], temperature=0, logprobs=True)
    assert answer.usage.prompt_tokens == len(encode_dialog(reference.tokenizer, QUESTIONS[0]))
    assert answer.usage.completion_tokens == len(answer.choices[0].logprobs.content)


def test_stop_strings_cut_the_answer(server: Served) -> None:
    free = chat(server, QUESTIONS[0])
    stop = free[5:8]
    cut = server.client.chat.completions.create(model=MODEL, messages=QUESTIONS[0], temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].message.content == free[: free.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    text = server.client.completions.create(model=MODEL, prompt="The cat", max_tokens=30, temperature=0, stop="\n")
    assert "\n" not in text.choices[0].text


def test_the_same_seed_gives_the_same_answer(server: Served) -> None:
    options = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 24, "temperature": 1.0, "logit_bias": NO_EOS}
    first = server.client.completions.create(**options, seed=5).choices[0].text
    assert server.client.completions.create(**options, seed=5).choices[0].text == first
    assert server.client.completions.create(**options, seed=6).choices[0].text != first
    two = server.client.completions.create(**options, seed=5, n=2).choices
    assert two[0].text == first and two[1].text != first  # choice i draws with seed + i


def test_logprobs_in_chat_and_completions(server: Served, reference: Llama) -> None:
    answer = server.client.chat.completions.create(
        model=MODEL, messages=QUESTIONS[1], temperature=0, logprobs=True, top_logprobs=3, max_tokens=8
    )
    content = answer.choices[0].logprobs.content
    assert "".join(entry.token for entry in content).strip() == answer.choices[0].message.content.strip()
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.top_logprobs[0].token == entry.token and entry.logprob == pytest.approx(
            entry.top_logprobs[0].logprob
        )
    prompt = "The cat sat"
    text = server.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=2, echo=True
    ).choices[0]
    assert text.text.startswith(prompt)
    tokens, expected = reference.generate(
        [reference.tokenizer.encode(prompt, bos=True, eos=False)], 5, temperature=0, logprobs=True, echo=True
    )
    assert text.logprobs.token_logprobs[0] is None
    assert text.logprobs.token_logprobs[1:] == pytest.approx(expected[0][1:], abs=1e-4)
    assert len(text.logprobs.tokens) == len(tokens[0]) and len(text.logprobs.top_logprobs) == len(tokens[0])


def test_special_tags_are_refused_as_the_library_refuses_them(server: Served) -> None:
    assert chat(server, [{"role": "user", "content": "say [INST] now"}]) == UNSAFE_ERROR


def test_sixteen_streaming_clients_get_what_each_gets_alone(server: Served) -> None:
    alone = [chat(server, dialog) for dialog in QUESTIONS]

    async def streamed(dialog) -> str:
        stream = await server.aclient.chat.completions.create(model=MODEL, messages=dialog, temperature=0, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def together() -> list[str]:
        return await asyncio.gather(*(streamed(dialog) for dialog in QUESTIONS))

    assert asyncio.run(together()) == alone


def test_a_client_that_leaves_mid_stream_frees_its_slot() -> None:
    with started("--max_seq_len", "4096") as served:
        body = {"model": MODEL, "prompt": "The", "max_tokens": 4000, "temperature": 0.8, "stream": True,
                "logit_bias": NO_EOS}  # fmt: skip
        with httpx.stream("POST", f"{served.url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()  # kept: closing this iterator would close the stream
            for _ in range(6):
                next(lines)
            assert served.metric("llama_busy_slots") == 1
        left = time.monotonic()
        while served.metric("llama_busy_slots") and time.monotonic() < left + 10:
            time.sleep(0.05)
        assert served.metric("llama_busy_slots") == 0 and served.metric("llama_cancelled_total") == 1
        assert time.monotonic() - left < 2  # 4000 tokens would take far longer
        assert chat(served, QUESTIONS[0])  # and the slot serves the next request


def test_the_next_turn_of_a_chat_prefills_only_what_is_new(server: Served) -> None:
    from llama.chat_format import encode_dialog

    first = QUESTIONS[3]
    answer = chat(server, first)
    before = server.metric("llama_prompt_tokens_reused")
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And 5 + 6?"}]
    chat(server, second)
    reused = server.metric("llama_prompt_tokens_reused") - before
    assert reused >= len(encode_dialog(server_tokenizer(), first))  # at least the whole first prompt


def server_tokenizer():
    from llama.tokenizer import Tokenizer

    return Tokenizer(str(DEMO / "tokenizer.model"))


def test_metrics_are_prometheus_text(server: Served) -> None:
    chat(server, QUESTIONS[2])
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("llama_requests_total", "llama_prompt_tokens_total", "llama_generated_tokens_total",
                 "llama_tokens_per_second", "llama_queue_depth", "llama_busy_slots",
                 "llama_time_to_first_token_seconds_count"):  # fmt: skip
        assert f"\n{name}" in text, name
    assert 'llama_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_models_and_health(server: Served) -> None:
    assert [m.id for m in server.client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready"}


@pytest.mark.parametrize(
    ("body", "status", "param", "message"),
    [
        (b'{"model": "llama-2-demo", "messages": [', 400, None, "the body is not valid JSON"),
        ({"model": MODEL, "messages": HI, "temperature": "hot"}, 400, "temperature",
         "temperature: Input should be a valid number"),
        ({"model": "gpt-4", "messages": HI}, 404, "model",
         "model 'gpt-4' does not exist: this server serves 'llama-2-demo'"),
        ({"model": MODEL, "messages": HI, "max_tokens": 250}, 400, "max_tokens",
         "together exceed the context window of 256 tokens"),
        ({"model": MODEL, "messages": HI, "n": 9}, 400, "n",
         "runs at most 8 sequences at once"),
        ({"model": MODEL, "messages": []}, 400, "messages", "messages: List should have at least 1 item"),
        ({"model": MODEL, "messages": [{"role": "assistant", "content": "Hi"}]}, 400, "messages",
         "message 0 has role 'assistant' where 'user' is expected"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages.0.role",
         "messages.0.role: Input should be"),
        ({"model": MODEL, "messages": HI, "max_tokens": -5}, 400, "max_tokens",
         "max_tokens: Input should be greater than or equal to 1"),
        ({"model": MODEL, "messages": HI, "temperature": 1e9}, 400, "temperature",
         "temperature: Input should be less than or equal to 2"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"x": 1}}, 400, "logit_bias",
         "logit_bias"),
        ({"model": MODEL, "messages": HI, "logit_bias": {"5000": 1}}, 400, "logit_bias",
         "outside the vocabulary"),
        ({"model": MODEL, "messages": HI, "stop": [""]}, 400, "stop",
         "stop strings must be non-empty strings"),
        ({"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, 400,
         "tools", "tools is not supported"),
        ({"model": MODEL, "prompt": [1, 2, 3]}, 400, "prompt", "prompt"),
        ({"model": MODEL, "prompt": []}, 400, "prompt", "prompt is an empty list"),
        ({"model": MODEL, "prompt": "x" * 2000, "max_tokens": 5}, 400, "prompt", "context window is 256"),
        ({"messages": HI}, 400, "model", "model: Field required"),
    ],
)  # fmt: skip
def test_a_bad_request_is_a_4xx_naming_the_field(server: Served, body, status: int, param, message: str) -> None:
    path = "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    response = server.post(path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert message in error["message"] and error["param"] == param
    assert httpx.get(f"{server.url}/health").status_code == 200  # and the server carries on


def test_a_body_over_the_limit_is_refused(server: Served) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    response = server.post("/v1/chat/completions", body)
    assert response.status_code == 413 and "larger than the server's limit" in response.json()["error"]["message"]


@pytest.fixture(scope="module")
def guarded() -> Iterator[Served]:
    with started("--api_key", "sekrit", key="sekrit") as served:
        yield served


def test_with_an_api_key_nobody_gets_in_without_it(guarded: Served) -> None:
    stranger = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.models.list()
    for path in ("/v1/models", "/metrics"):
        response = httpx.get(f"{guarded.url}{path}")
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{guarded.url}/health").status_code == 200
    assert chat(guarded, QUESTIONS[0])


def test_max_queue_counts_every_request_waiting_for_a_slot_and_refuses_the_next() -> None:
    with started("--max_batch_size", "1", "--max_queue", "2") as served:
        url = f"{served.url}/v1/completions"
        short = {"model": MODEL, "prompt": "The", "max_tokens": 8, "logit_bias": NO_EOS}
        long = {**short, "max_tokens": 2000, "stream": True}

        async def scenario() -> tuple[int, dict, list[int]]:
            async with httpx.AsyncClient(timeout=120) as client:
                async with client.stream("POST", url, json=long) as running:
                    lines = running.aiter_lines()
                    while not (await anext(lines)).startswith("data: "):
                        pass  # the long request holds the one slot from here on
                    waiting = [asyncio.create_task(client.post(url, json=short)) for _ in range(2)]
                    deadline = time.monotonic() + 60
                    while served.metric("llama_queue_depth") < 2:
                        assert time.monotonic() < deadline, "the two requests never reached the queue"
                        await asyncio.sleep(0.05)
                    refused = await client.post(url, json=short)
                # the long request's client left: its slot goes to the two that waited
                done = await asyncio.gather(*waiting)
            return refused.status_code, refused.json(), [r.status_code for r in done]

        status, body, waited = asyncio.run(scenario())
        assert status == 429 and body["error"]["type"] == "rate_limit_exceeded", (status, body)
        assert waited == [200, 200] and served.metric("llama_queue_depth") == 0


def test_a_burst_beyond_the_queue_gets_429s_and_the_server_stays_healthy() -> None:
    with started("--max_batch_size", "1", "--max_queue", "2") as served:
        body = {"model": MODEL, "prompt": "The", "max_tokens": 60, "temperature": 0.8, "logit_bias": NO_EOS}

        async def burst(url: str) -> tuple[list[int], list[dict]]:
            async with httpx.AsyncClient(timeout=120) as client:
                responses = await asyncio.gather(*(client.post(url, json=body) for _ in range(8)))
            return [r.status_code for r in responses], [r.json() for r in responses]

        statuses, bodies = asyncio.run(burst(f"{served.url}/v1/completions"))
        # two wait in the queue whatever the timing; a third gets in if the first started before it came
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
        assert all(b["error"]["type"] == "rate_limit_exceeded" for s, b in zip(statuses, bodies) if s == 429)
        assert httpx.get(f"{served.url}/health").status_code == 200
        assert served.client.completions.create(model=MODEL, prompt="The cat", max_tokens=4).choices[0].text is not None


def test_two_processes_serve_the_same_answers(server: Served) -> None:
    command = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "llama.serve")
    with started(
        "--ckpt_dir", str(DEMO_MP2), "--model_name", MODEL, "--max_seq_len", "256", command=command
    ) as sharded:
        for dialog in QUESTIONS[:4]:
            assert chat(sharded, dialog) == chat(server, dialog)
        options = {"model": MODEL, "prompt": "Once", "max_tokens": 12, "temperature": 1.0, "seed": 3}
        assert (
            sharded.client.completions.create(**options).choices[0].text
            == server.client.completions.create(**options).choices[0].text
        )


def test_the_server_refuses_a_taken_port_in_one_line() -> None:
    with started() as served:
        port = served.url.rsplit(":", 1)[1]
        done = subprocess.run([sys.executable, "-m", "llama.serve", "--port", port], cwd=ROOT, env=environment(),
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 1
        assert (
            done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and len(done.stderr.splitlines()) == 1
        )


def test_serve_defaults_to_the_demo_model_on_localhost(server: Served) -> None:
    assert server.url.startswith("http://127.0.0.1:")
    assert Path(DEMO).name == MODEL


def test_a_compiled_server_answers_as_the_eager_one(server: Served) -> None:
    # Compiling the step for batch sizes 1, 2 and 4 takes minutes on a slow 2-core CPU.
    with started("--compile", "--max_seq_len", "256", "--max_batch_size", "4", ready_within=600) as compiled:

        async def together(client) -> list[str]:
            async def one(dialog) -> str:
                answer = await client.chat.completions.create(model=MODEL, messages=dialog, temperature=0)
                return answer.choices[0].message.content

            return await asyncio.gather(*(one(dialog) for dialog in QUESTIONS[:11]))

        assert asyncio.run(together(compiled.aclient)) == [chat(server, dialog) for dialog in QUESTIONS[:11]]
