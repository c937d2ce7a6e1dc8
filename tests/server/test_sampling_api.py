"""vLLM's sampling options over HTTP with the official openai client: logprobs (chat and completions, streamed
and not), n, best_of, a completions batch, echo, penalties, min_tokens, logit_bias, allowed_token_ids, and
their errors (400 naming the field)."""

import json
import urllib.request

import openai
import pytest


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key="unused", max_retries=0)


VLLM_ONLY = {
    "allowed_token_ids",
    "min_tokens",
    "repetition_penalty",
    "min_p",
    "stop_token_ids",
    "bad_words",
    "prompt_logprobs",
    "include_stop_str_in_output",
    "truncate_prompt_tokens",
    "return_tokens_as_token_ids",
    "skip_special_tokens",
}


def complete(client, **kw):
    """A completion; vLLM's own fields go in the body as the openai client's extra_body."""
    extra = {k: kw.pop(k) for k in VLLM_ONLY & set(kw)}
    return client.completions.create(
        model="tiny", **{"prompt": [5, 6, 7, 8], "max_tokens": 8, **kw}, extra_body=extra or None
    )


def test_completion_logprobs_streamed_equal_whole(client):
    whole = complete(client, logprobs=3, temperature=0)
    lp = whole.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == whole.usage.completion_tokens
    assert all(
        len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-5)  # greedy: the top one
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs)
    )
    assert " ".join(lp.tokens) == whole.choices[0].text  # each token decoded alone (word-level: no spaces)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    chunks = [c for c in complete(client, logprobs=3, temperature=0, stream=True) if c.choices]
    assert [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == pytest.approx(
        lp.token_logprobs
    )
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_chat_logprobs_streamed_equal_whole(client):
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "w10 w11"}],
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    whole = client.chat.completions.create(**kw)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert all(
        len(e.top_logprobs) == 2
        and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        and e.bytes == list(e.token.encode())
        for e in content
    )
    streamed = [
        e
        for c in client.chat.completions.create(stream=True, **kw)
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None


def test_n_equals_seeded_requests_streamed_or_not(client):
    kw = dict(temperature=1.0, max_tokens=6, seed=5)
    whole = complete(client, n=3, **kw)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    separate = [complete(client, **{**kw, "seed": 5 + j}).choices[0].text for j in range(3)]
    assert [c.text for c in whole.choices] == separate
    assert whole.usage.completion_tokens == 18 and whole.usage.prompt_tokens == 4
    texts = {}
    for chunk in complete(client, n=3, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(3)] == separate


def test_chat_n(client):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "w3"}], max_tokens=5, temperature=1.0, seed=9)
    whole = client.chat.completions.create(n=2, **kw)
    single = [client.chat.completions.create(**{**kw, "seed": 9 + j}).choices[0].message.content for j in range(2)]
    assert [c.message.content for c in whole.choices] == single


def test_best_of_returns_the_best_per_token_logprob(client):
    kw = dict(temperature=1.5, max_tokens=5, seed=40)
    best = complete(client, best_of=4, **kw)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    candidates = [complete(client, logprobs=0, **{**kw, "seed": 40 + j}).choices[0] for j in range(4)]
    top = max(candidates, key=lambda c: sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs))
    assert best.choices[0].text == top.text


def test_a_batch_of_prompts_gives_choices_in_order(client):
    prompts = ["w1 w2", "w3 w4 w5"]
    batch = complete(client, prompt=prompts, n=2, temperature=0, max_tokens=4)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    single = [complete(client, prompt=p, temperature=0, max_tokens=4).choices[0].text for p in prompts]
    assert [c.text for c in batch.choices] == [single[0], single[0], single[1], single[1]]
    assert batch.usage.prompt_tokens == 5


def test_echo_puts_the_prompt_first(client):
    plain = complete(client, prompt="w7 w8", temperature=0, max_tokens=3).choices[0].text
    echoed = complete(client, prompt="w7 w8", temperature=0, max_tokens=3, echo=True).choices[0].text
    assert echoed == "w7 w8" + plain


def test_prompt_logprobs_and_echo_with_logprobs(client):
    prompt = [5, 6, 7, 8]
    whole = complete(client, prompt=prompt, prompt_logprobs=2, temperature=0, max_tokens=2)
    scored = whole.choices[0].prompt_logprobs
    assert scored[0] is None and len(scored) == 4
    for token, entry in zip(prompt[1:], scored[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3  # the token itself and the top 2
        assert sorted(e["rank"] for e in entry.values())[:2] == [1, 2]
    echoed = complete(client, prompt=prompt, echo=True, logprobs=1, temperature=0, max_tokens=2).choices[0]
    lp = echoed.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.tokens) == 4 + 2
    assert lp.token_logprobs[1:4] == pytest.approx([scored[i][str(prompt[i])]["logprob"] for i in (1, 2, 3)])
    chat = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "w1"}], max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert chat.model_extra["prompt_logprobs"][0] is None and len(chat.model_extra["prompt_logprobs"]) > 1


def test_processing_options_change_the_output(client, tiny_server):
    greedy = complete(client, temperature=0, max_tokens=12).choices[0]
    first = greedy.text.split()[0]
    body = json.dumps({"model": "tiny", "prompt": first, "add_special_tokens": False}).encode()
    with urllib.request.urlopen(urllib.request.Request(f"{tiny_server.url}/tokenize", body)) as r:
        ids = json.load(r)["tokens"]
    biased = complete(client, temperature=0, max_tokens=5, logit_bias={str(ids[0]): 100}).choices[0].text
    assert biased.split() == [first] * 5
    allowed = complete(client, temperature=1.0, max_tokens=5, allowed_token_ids=ids).choices[0].text
    assert allowed.split() == [first] * 5
    stopped = complete(client, temperature=0, max_tokens=12, stop_token_ids=ids)
    assert stopped.usage.completion_tokens == 1 and stopped.choices[0].finish_reason == "stop"
    held = complete(client, temperature=0, max_tokens=12, stop_token_ids=ids, min_tokens=4)
    assert held.usage.completion_tokens >= 4
    penalized = (
        complete(
            client, temperature=0, max_tokens=12, frequency_penalty=2.0, presence_penalty=2.0, repetition_penalty=2.0
        )
        .choices[0]
        .text
    )
    words = penalized.split()
    assert len(set(words)) == len(words)  # such penalties never repeat a word in 12 greedy tokens of a tiny model
    assert (
        complete(client, temperature=1.0, max_tokens=6, min_p=1.0, seed=1).choices[0].text
        == complete(client, temperature=0, max_tokens=6).choices[0].text
    )  # min_p 1 keeps only the top token


def test_text_and_prompt_options(client):
    greedy = complete(client, temperature=0, max_tokens=10).choices[0].text
    stop = greedy.split()[2]
    kept = complete(client, temperature=0, max_tokens=10, stop=[stop], include_stop_str_in_output=True)
    assert kept.choices[0].text == greedy[: greedy.index(stop) + len(stop)]
    streamed = complete(client, temperature=0, max_tokens=10, stop=[stop], include_stop_str_in_output=True, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == kept.choices[0].text
    truncated = complete(client, prompt=list(range(10, 30)), truncate_prompt_tokens=5, temperature=0, max_tokens=3)
    assert truncated.usage.prompt_tokens == 5
    assert (
        truncated.choices[0].text
        == complete(client, prompt=list(range(25, 30)), temperature=0, max_tokens=3).choices[0].text
    )
    named = complete(client, logprobs=1, return_tokens_as_token_ids=True, max_tokens=3).choices[0].logprobs.tokens
    assert all(t.startswith("token_id:") and t[9:].isdigit() for t in named)
    assert complete(client, temperature=0, max_tokens=4, skip_special_tokens=False).choices[0].text


def test_chat_template_options(client):
    turns = [{"role": "user", "content": "w1 w2"}, {"role": "assistant", "content": "w3"}]
    kw = dict(model="tiny", max_tokens=1)
    opened = client.chat.completions.create(messages=turns[:1], **kw).usage.prompt_tokens
    closed = client.chat.completions.create(
        messages=turns[:1], extra_body={"add_generation_prompt": False}, **kw
    ).usage.prompt_tokens
    assert closed < opened  # no assistant header
    continued = client.chat.completions.create(
        messages=turns, **kw, extra_body={"add_generation_prompt": False, "continue_final_message": True}
    ).usage.prompt_tokens
    after = client.chat.completions.create(messages=turns, **kw).usage.prompt_tokens
    assert continued < after  # the assistant turn stays open: no end-of-turn, no new header
    for extra, param in (
        ({"continue_final_message": True}, "continue_final_message"),
        ({"add_generation_prompt": "no"}, "add_generation_prompt"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(messages=turns, **kw, extra_body=extra)
        assert e.value.body["param"] == param
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            messages=turns[:1], **kw, extra_body={"add_generation_prompt": False, "continue_final_message": True}
        )
    assert e.value.body["param"] == "continue_final_message"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"best_of": 1, "n": 2}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"logit_bias": {"100000": 1}}, "logit_bias"),
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_p": 1.5}, "min_p"),
        ({"min_tokens": 9}, "min_tokens"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"bad_words": [1]}, "bad_words"),
        ({"echo": True, "logprobs": 1, "stream": True}, "echo"),
        ({"n": True}, "n"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"best_of": 10**9}, "best_of"),
        ({"n": 129}, "n"),
        ({"prompt": ["w1"] * 257}, "prompt"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"skip_special_tokens": 1}, "skip_special_tokens"),
    ],
)
def test_bad_values_are_400_naming_the_field(client, fields, param):
    with pytest.raises(openai.BadRequestError) as e:
        complete(client, **fields)
    assert e.value.body["param"] == param


def test_top_logprobs_needs_logprobs(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w1"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"
