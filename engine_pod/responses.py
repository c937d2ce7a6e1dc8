"""The completion endpoints' responses: a request's choices sent to the engine, their tokens read back into
OpenAI's response objects, streamed (SSE chunks) or as one JSON body.

A stream of one plain choice (the common case) has a short path: its chunks differ only in their text, so
the rest of each chunk is encoded once. Several choices (n, a completions batch), logprobs or echo take the
general path: each choice's deltas as they come, one chunk each, tagged with the choice's index.
"""

import asyncio
import contextlib
import json
import time

from aiohttp import web

from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.chat_output import ChatOutput
from nanoserve.engine_pod.choices import Choice
from nanoserve.engine_pod.errors import ServerShutdown
from nanoserve.engine_pod.openai_protocol import ParsedRequest
from nanoserve.engine_pod.sampling_params import SamplingParams, best_of
from nanoserve.engine_pod.server_logs import TOKENS
from nanoserve.engine_pod.server_state import ServerState
from nanoserve.engine_pod.text_stream import TextStream


def engine_requests(req: ParsedRequest) -> list[tuple[int, list[int], SamplingParams]]:
    """(prompt index, prompt ids, params) of every engine request: best_of (or n) a prompt, prompt after prompt."""
    return [
        (i, ids, params.child(j))
        for i, (ids, params) in enumerate(req.prompts)
        for j in range(params.best_of or params.n)
    ]


async def respond(
    request: web.Request, state: ServerState, engine, submitted: list, req: ParsedRequest, rid: str, chat: bool
) -> web.StreamResponse:
    """The response to `req`, whose engine requests (engine_requests' order) are `submitted`."""
    if req.stream and len(submitted) == 1 and req.params.logprobs is None and not req.echo:
        return await _stream(request, state, engine, submitted[0], req, rid, chat)
    choices = []
    for index, (prompt, ids, params) in enumerate(engine_requests(req)):
        echo = state.tokenizer.decode(ids, skip_special_tokens=True) if req.echo else ""
        choices.append(Choice(index, prompt, state.tokenizer, req, params, chat, echo))
    pairs = list(zip(choices, submitted))
    if req.stream:
        return await _stream_choices(request, state, engine, pairs, req, rid, chat)
    return await _complete(request, state, engine, pairs, req, rid, chat)


def _client_gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _chat_output(req: ParsedRequest) -> ChatOutput:
    return ChatOutput(req.tool_use, req.reasoning, req.thinking_in_prompt)


def _prompt_tokens(req: ParsedRequest) -> int:
    return sum(len(ids) for ids, _ in req.prompts)


def _usage(req: ParsedRequest, completion_tokens: int, cached: int) -> dict:
    n = _prompt_tokens(req)
    return {
        "prompt_tokens": n,
        "completion_tokens": completion_tokens,
        "total_tokens": n + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _note_tokens(request: web.Request, req: ParsedRequest, completion_tokens: int) -> None:
    """The token counts of the request's access line (server_logs)."""
    request[TOKENS] = (_prompt_tokens(req), completion_tokens)


def _chunk_sender(resp: web.StreamResponse, rid: str, obj: str, created: int, model: str):
    """`send(choices, **extra)`: one SSE chunk of a stream."""

    async def send(choices: list, **extra) -> None:
        chunk = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices, **extra}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

    return send


def _cached(choices: list[Choice]) -> int:
    """Prompt tokens found in the prefix cache: each prompt's first request's (its siblings reuse its blocks)."""
    firsts = {}
    for c in choices:
        firsts.setdefault(c.prompt, c.cached)
    return sum(firsts.values())


async def _collect(request, engine, choice: Choice, submitted) -> bool:
    """Run one choice to its end (False: the client left first)."""
    gen = engine.generate(submitted, gone=lambda: _client_gone(request))
    try:
        async for delta in gen:  # one delta, at the end
            choice.absorb(delta)
    finally:
        await gen.aclose()
    return choice.finish is not None


async def _complete(request, state, engine, pairs, req, rid, chat) -> web.Response:
    try:
        done = await asyncio.gather(*(_collect(request, engine, c, s) for c, s in pairs))
    except ServerShutdown as e:
        raise APIError(503, str(e), code="server_shutdown", type="service_unavailable") from None
    if not all(done):  # the client left: nobody reads an answer
        return web.Response(status=499)
    choices = [c for c, _ in pairs]
    kept = choices
    if req.params.ranks_best_of:
        groups = [[c for c in choices if c.prompt == i] for i in range(len(req.prompts))]
        kept = [g[k] for g in groups for k in best_of([c.mean_logprob for c in g], req.params.n)]
    for index, c in enumerate(kept):
        c.index = index
    body = {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": state.model_name,
        "choices": [c.final() for c in kept],
        "usage": _usage(req, sum(c.count for c in choices), _cached(choices)),
    }
    _note_tokens(request, req, sum(c.count for c in choices))
    if chat and req.params.prompt_logprobs is not None:  # chat: one prompt, its logprobs beside the choices
        body["prompt_logprobs"] = kept[0].prompt_logprobs
    return web.json_response(body)


async def _stream_choices(request, state, engine, pairs, req, rid, chat) -> web.StreamResponse:
    """A stream of several choices (n, a completions batch), or of one with logprobs or echo: each choice's
    deltas as they come, one chunk each, tagged with the choice's index."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    arrived: asyncio.Queue = asyncio.Queue()

    async def follow(choice: Choice, submitted) -> None:
        gen = engine.generate(submitted, gone=lambda: _client_gone(request))
        try:
            async for delta in gen:
                arrived.put_nowait((choice, delta))
        except Exception as e:  # noqa: BLE001 - the engine failed: the stream says so
            arrived.put_nowait((choice, e))
        finally:
            await gen.aclose()
            arrived.put_nowait((choice, None))

    send = _chunk_sender(resp, rid, obj, created, state.model_name)

    tasks = [asyncio.create_task(follow(c, s)) for c, s in pairs]
    try:
        if chat:
            await send(
                [
                    {
                        "index": c.index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    for c, _ in pairs
                ]
            )
        following = len(tasks)
        while following:
            choice, item = await arrived.get()
            if item is None:
                following -= 1
                if choice.finish is None:
                    return resp  # the client left: released by the caller (the engine aborts the rest)
                continue
            if isinstance(item, Exception):
                raise item
            piece, part = choice.push(item)
            out = choice.chunk(piece, part)
            if out is not None:
                await send([out])
        if req.include_usage:
            choices = [c for c, _ in pairs]
            await send([], usage=_usage(req, sum(c.count for c in choices), _cached(choices)))
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass
    except Exception as e:  # noqa: BLE001 - the engine failed mid-stream: say so in the stream, then end it
        await _stream_error(resp, e)
    finally:
        for t in tasks:
            t.cancel()
        _note_tokens(request, req, sum(c.count for c, _ in pairs))
    return resp


async def _stream_error(resp: web.StreamResponse, e: Exception) -> None:
    body = (
        APIError(503, str(e), code="server_shutdown")
        if isinstance(e, ServerShutdown)
        else APIError(500, f"engine failed: {type(e).__name__}: {e}", code="engine_failed")
    ).body()
    with contextlib.suppress(ConnectionResetError):
        await resp.write(f"data: {json.dumps(body)}\n\n".encode())


async def _stream(request, state, engine, submitted, req, rid, chat) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    created, obj = int(time.time()), "chat.completion.chunk" if chat else "text_completion"
    # A stream sends thousands of chunks that differ only in their text: the rest is encoded once.
    head = (
        "data: "
        + json.dumps({"id": rid, "object": obj, "created": created, "model": state.model_name})[:-1]
        + ', "choices": [{"index": 0, '
    ).encode()

    send = _chunk_sender(resp, rid, obj, created, state.model_name)

    output = _chat_output(req) if chat else None

    async def send_text(text: str, finish: str | None) -> None:
        if output is not None and not output.plain:  # reasoning or tool calls: a delta object a step
            delta = output.push(text, finish is not None).to_openai()
            if delta or finish:
                await send(
                    [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": output.finish_reason(finish)}]
                )
            return
        if chat:
            delta = f'{{"content": {json.dumps(text)}}}' if text or not finish else "{}"
            body = f'"delta": {delta}, "logprobs": null, "finish_reason": {json.dumps(finish)}}}]}}\n\n'
        else:
            body = f'"text": {json.dumps(text)}, "logprobs": null, "finish_reason": {json.dumps(finish)}}}]}}\n\n'
        await resp.write(head + body.encode())

    p = req.params
    text = TextStream(state.tokenizer, p.stop, p.skip_special_tokens, p.include_stop_str_in_output)
    cached = count = 0
    gen = engine.generate(submitted, gone=lambda: _client_gone(request))
    try:
        if chat:
            await send(
                [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            )
        async for delta in gen:
            if _client_gone(request):
                return resp  # released by the caller: the engine aborts it and frees its blocks
            finish, cached, count = delta.finish_reason, delta.num_cached_tokens, count + len(delta.token_ids)
            piece = text.push(delta.token_ids, finish is not None)
            if piece or finish:
                await send_text(piece, finish)
        if req.include_usage:
            await send([], usage=_usage(req, count, cached))
        await resp.write(b"data: [DONE]\n\n")
    except ConnectionResetError:
        pass  # client went away mid-write
    except Exception as e:  # noqa: BLE001 - the engine failed mid-stream: say so in the stream, then end it
        await _stream_error(resp, e)
    finally:
        await gen.aclose()
        _note_tokens(request, req, count)
    return resp
