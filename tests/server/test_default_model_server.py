"""`nanoserve serve` on the embedded default model, as `make serve` runs it, through the openai client."""

import openai


def test_default_model_answers_chat(default_server):
    server = default_server
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2-135m"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in whole.choices[0].message.content
    streamed = client.chat.completions.create(
        model="smollm2-135m", messages=messages, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == whole.choices[0].message.content
    text = (
        client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4, temperature=0)
        .choices[0]
        .text
    )
    assert "Paris" in text


def test_32_concurrent_streams_give_the_non_streaming_text(default_server):
    """Each prompt is sent twice at once, streaming and not: the two run in the same engine steps, so the
    greedy tokens are the same, and the streamed deltas must add up to exactly the whole text (also where
    a character spans several tokens: the emoji, the dash, the guillemet, the accent)."""
    import asyncio

    client = openai.AsyncOpenAI(base_url=f"{default_server.url}/v1", api_key="unused", max_retries=0)
    topics = ["The sea", "In Paris,", "A cat", "def main():", "Trees", "The moon 🌙", "Bread is", "Café"]
    prompts = [f"{t} {w}" for w in ("and", "—", "«", "1.") for t in topics]
    params = dict(model="smollm2-135m", max_tokens=5, temperature=0)  # 64 rows a step: slow on a CPU

    async def streamed(p: str) -> str:
        chunks = await client.completions.create(prompt=p, stream=True, **params)
        return "".join([c.choices[0].text async for c in chunks if c.choices])

    async def whole(p: str) -> str:
        return (await client.completions.create(prompt=p, **params)).choices[0].text

    async def main():
        return await asyncio.gather(asyncio.gather(*map(streamed, prompts)), asyncio.gather(*map(whole, prompts)))

    got, want = asyncio.run(main())
    assert len(prompts) == 32 and got == want and len(set(want)) > 24


def test_the_server_process_leaves_torch_to_its_engine_core(default_server):
    """The HTTP process only tokenizes: torch (a second or two and ~250 MB) is loaded by its engine core alone."""
    import pathlib

    def maps_torch(pid: int) -> bool:
        return "libtorch" in pathlib.Path(f"/proc/{pid}/maps").read_text()

    pid = default_server.proc.pid
    children = [int(c) for c in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    assert not maps_torch(pid)
    assert any(maps_torch(child) for child in children)  # the engine core
