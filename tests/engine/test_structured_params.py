"""Request fields that ask for structured output: each becomes one StructuredOutputsParams, and each wrong
use is a 400 naming its field (never silently ignored)."""

import pytest

from nanoserve.engine_pod.api_error import APIError
from nanoserve.engine_pod.openai_protocol import parse_completion
from nanoserve.engine_pod.structured_params import StructuredOutputsParams as SO
from nanoserve.engine_pod.structured_params import request_constraint

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def parse(**fields):
    return parse_completion({"prompt": [1, 2, 3], "max_tokens": 4, **fields}, None, 100, 64).params.structured_outputs


@pytest.mark.parametrize(
    "fields, want",
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, SO(json_object=True, param="response_format")),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": SCHEMA, "strict": True},
                }
            },
            SO(json=SCHEMA, strict=True, param="response_format"),
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
            SO(json=SCHEMA, strict=False, param="response_format"),
        ),
        ({"structured_outputs": {"choice": ["a", "b"]}}, SO(choice=["a", "b"])),
        (
            {"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
            SO(json=SCHEMA, disable_any_whitespace=True),
        ),
        ({"structured_outputs": {"regex": "a+", "disable_fallback": True}}, SO(regex="a+")),
        ({"guided_json": SCHEMA}, SO(json=SCHEMA, param="guided_json")),
        ({"guided_json": '{"type": "object"}'}, SO(json='{"type": "object"}', param="guided_json")),
        ({"guided_regex": "[0-9]+"}, SO(regex="[0-9]+", param="guided_regex")),
        ({"guided_choice": ["maybe", "never"]}, SO(choice=["maybe", "never"], param="guided_choice")),
        ({"guided_grammar": 'root ::= "x"'}, SO(grammar='root ::= "x"', param="guided_grammar")),
    ],
)
def test_constraint_fields(fields, want):
    assert parse(**fields) == want


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
            "response_format.json_schema.name",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": 1}}},
            "response_format",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        ({"structured_outputs": ["a"]}, "structured_outputs"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_choice": ["a", 1]}, "guided_choice"),
        ({"guided_regex": 5}, "guided_regex"),
        ({"guided_json": [1]}, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ],
)
def test_bad_constraints_are_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as e:
        parse(**fields)
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_request_constraint_keys_are_equal_for_equal_schemas():
    a = request_constraint({"guided_json": {"b": 1, "a": 2}})
    b = request_constraint({"structured_outputs": {"json": {"a": 2, "b": 1}}})
    assert a.key() == b.key()
