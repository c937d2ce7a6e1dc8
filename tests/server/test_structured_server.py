"""Structured output through a real `nanoserve serve` process (async scheduling on): the official openai
client's response_format, vLLM's guided_* and structured_outputs fields, streamed and not, and the 400s."""

import json
import re

import openai
import pytest
from bpe_model import SCHEMA

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")


@pytest.fixture(scope="module")
def client(bpe_server):
    return openai.OpenAI(base_url=f"{bpe_server.url}/v1", api_key="unused", max_retries=0)


def test_response_format_json_schema_with_the_openai_client(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for kw in ({"temperature": 0}, {"temperature": 1, "seed": 5}):
        out = client.chat.completions.create(
            model="bpe", messages=[{"role": "user", "content": "a person"}], response_format=rf, max_tokens=300, **kw
        )
        assert out.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(out.choices[0].message.content), SCHEMA)
    out = client.chat.completions.create(
        model="bpe",
        messages=[{"role": "user", "content": "json"}],
        response_format={"type": "json_object"},
        max_tokens=300,
        seed=1,
    )
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_guided_fields_on_completions_streamed_and_not(client):
    out = client.completions.create(
        model="bpe", prompt="pick", max_tokens=20, temperature=0, extra_body={"guided_choice": ["maybe", "never"]}
    )
    assert out.choices[0].text in ("maybe", "never") and out.choices[0].finish_reason == "stop"
    chunks = client.completions.create(
        model="bpe",
        prompt="code",
        max_tokens=20,
        seed=3,
        stream=True,
        extra_body={"structured_outputs": {"regex": "[a-z]{3}-[0-9]{2,4}"}},
    )
    assert re.fullmatch("[a-z]{3}-[0-9]{2,4}", "".join(c.choices[0].text for c in chunks))
    plain = client.completions.create(
        model="bpe", prompt="code", max_tokens=8, temperature=0, extra_body={"response_format": {"type": "text"}}
    )
    assert plain.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
            "response_format",
        ),
        ({"guided_regex": "a(("}, "guided_regex"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ],
)
def test_bad_constraints_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="bpe", messages=[{"role": "user", "content": "x"}], max_tokens=5, extra_body=extra
        )
    assert e.value.status_code == 400 and e.value.body["param"] == param
