"""The official openai client against a real server: completions and chat, streamed and not."""

import asyncio
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_completion_streamed_equals_whole(client):
    kw = dict(model="tiny", prompt="w5 w6 w7 w8", max_tokens=16, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == 4 and whole.usage.completion_tokens == 16
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_completion_with_token_ids_and_stop(client):
    whole = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=16, temperature=0)
    words = whole.choices[0].text.split()
    stopped = client.completions.create(
        model="tiny", prompt=[5, 6, 7, 8], max_tokens=16, temperature=0, stop=[words[2]]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text.split() == words[: words.index(words[2])]
    streamed = client.completions.create(
        model="tiny", prompt=[5, 6, 7, 8], max_tokens=16, temperature=0, stop=[words[2]], stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == stopped.choices[0].text


def test_chat_streamed_equals_whole(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "w10 w11"}], max_tokens=12, temperature=0)
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_reproduces(client):
    kw = dict(model="tiny", prompt="w20 w21", max_tokens=10, temperature=1.0, seed=7)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_prefix_cache_hit_is_reported(client):
    prompt = list(range(30, 30 + 40))
    client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    again = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens == 32  # two full 16-token blocks


def test_cache_salt_separates_prefixes(client):
    prompt = list(range(80, 80 + 40))

    def cached(**salt):
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=2, extra_body=salt)
        return out.usage.prompt_tokens_details.cached_tokens

    assert cached(cache_salt="a") == 0
    assert cached(cache_salt="b") == 0 and cached() == 0  # another salt, or none, shares nothing
    assert cached(cache_salt="a") == 32 and cached() == 32
    chat = dict(model="tiny", messages=[{"role": "user", "content": "w7 " * 40}], max_tokens=1)
    client.chat.completions.create(**chat, extra_body={"cache_salt": "c"})
    assert client.chat.completions.create(**chat).usage.prompt_tokens_details.cached_tokens == 0
    assert (
        client.chat.completions.create(**chat, extra_body={"cache_salt": "c"}).usage.prompt_tokens_details.cached_tokens
        >= 32
    )


def test_32_concurrent_streams_are_batched(tiny_server):
    client = openai.AsyncOpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)

    async def stream(i):
        text, tokens = "", 0
        async for c in await client.completions.create(
            model="tiny",
            prompt=[40 + i, 41, 42],
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
            stream_options={"include_usage": True},
        ):
            text += c.choices[0].text if c.choices else ""
            tokens = c.usage.completion_tokens if c.usage else tokens
        return text, tokens

    async def main():
        return await asyncio.gather(*(stream(i) for i in range(32)))

    before = engine_steps(tiny_server.url)  # the server is shared: earlier tests' steps are counted too
    results = asyncio.run(main())
    steps = engine_steps(tiny_server.url) - before
    assert len(results) == 32 and all(tokens == 48 and text for text, tokens in results)
    # One request a step would take 32 * 48 steps (each makes one token of one request, each counted
    # before its token is sent): fewer means steps that served several requests at once.
    assert steps < 32 * 48, steps


def engine_steps(url: str) -> float:
    """Engine steps so far (the count of vllm:iteration_tokens_total, one observation a step)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "vllm:iteration_tokens_total_count"
    )
