"""Structured output constraints: what a request asks its text to match, and the request fields that say it.

`StructuredOutputsParams` is vLLM's object of the same name (one of json/regex/choice/grammar/json_object);
`request_constraint` reads it from an OpenAI body: `response_format` (json_object, json_schema), vLLM's
`structured_outputs` object, or its older top-level `guided_json`/`guided_regex`/`guided_choice`/
`guided_grammar`. One constraint per request; each error names the field it came from.
Compiling it into a grammar is structured_output.py's job (xgrammar).
"""

import json as jsonlib
from dataclasses import dataclass

from nanoserve.engine_pod.errors import InvalidRequestError

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of `json` (a JSON schema, as a dict or its text), `regex`, `choice` (the output is one
    of these strings), `grammar` (EBNF in xgrammar's GBNF dialect, or Lark) or `json_object` (any JSON object)."""

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    strict: bool = True  # json: no properties or items beyond the schema's
    disable_any_whitespace: bool = False  # json: compact output, no free whitespace between tokens
    param: str = "structured_outputs"  # the request field it came from, for error messages

    def __post_init__(self):
        p = self.param
        set_ = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(set_) != 1:
            raise InvalidRequestError(
                f"'{p}' must set exactly one of {', '.join(_KINDS)}; got {', '.join(set_) or 'none'}", p
            )
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidRequestError(f"'{p}': a JSON schema must be an object or a string", p)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidRequestError(f"'{p}': {name} must be a non-empty string", p)
        if self.choice is not None and (
            not isinstance(self.choice, list)
            or not self.choice
            or not all(isinstance(c, str) and c for c in self.choice)
        ):
            raise InvalidRequestError(f"'{p}': choice must be a non-empty list of non-empty strings", p)
        for name in ("json_object", "strict", "disable_any_whitespace"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"'{p}': {name} must be a boolean", p)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    def key(self) -> tuple:
        """Hashable and equal for equal constraints: the grammar cache's key."""
        value = getattr(self, self.kind)
        if isinstance(value, dict):
            value = jsonlib.dumps(value, sort_keys=True)
        elif isinstance(value, list):
            value = tuple(value)
        return self.kind, value, self.strict, self.disable_any_whitespace


# structured_outputs keys beside the constraint: vLLM's options (disable_fallback means nothing with one backend).
_OPTIONS = {"disable_any_whitespace", "disable_additional_properties", "disable_fallback"}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def request_constraint(body: dict) -> StructuredOutputsParams | None:
    """The one constraint a request body asks for, or None. Raises InvalidRequestError naming the field."""
    found = []
    rf = _response_format(body.get("response_format"))
    if rf is not None:
        found.append(rf)
    so = body.get("structured_outputs")
    if so is not None:
        found.append(_structured_outputs(so))
    for field, kind in _GUIDED.items():
        if body.get(field) is not None:
            found.append(StructuredOutputsParams(**{kind: body[field]}, param=field))
    if len(found) > 1:
        raise InvalidRequestError(
            f"only one structured output constraint per request; got {found[0].param} and {found[1].param}",
            found[1].param,
        )
    return found[0] if found else None


def _response_format(rf) -> StructuredOutputsParams | None:
    p = "response_format"
    if rf is None:
        return None
    if not isinstance(rf, dict):
        raise InvalidRequestError(f"'{p}' must be an object", p)
    kind = rf.get("type")
    extra = set(rf) - {"type", "json_schema"}
    if extra:
        raise InvalidRequestError(f"'{p}' has unknown fields: {', '.join(sorted(extra))}", p)
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True, param=p)
    if kind != "json_schema":
        raise InvalidRequestError(
            f"'{p}.type' must be 'text', 'json_object' or 'json_schema', got {kind!r}", f"{p}.type"
        )
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise InvalidRequestError(f"'{p}.json_schema' is required with type 'json_schema'", f"{p}.json_schema")
    extra = set(spec) - {"name", "schema", "strict", "description"}
    if extra:
        raise InvalidRequestError(f"'{p}.json_schema' has unknown fields: {', '.join(sorted(extra))}", p)
    if not isinstance(spec.get("name"), str) or not spec["name"]:
        raise InvalidRequestError(f"'{p}.json_schema.name' must be a non-empty string", f"{p}.json_schema.name")
    if not isinstance(spec.get("schema"), dict):
        raise InvalidRequestError(f"'{p}.json_schema.schema' must be a JSON schema object", p)
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise InvalidRequestError(f"'{p}.json_schema.strict' must be a boolean", p)
    return StructuredOutputsParams(json=spec["schema"], strict=bool(strict), param=p)


def _structured_outputs(so) -> StructuredOutputsParams:
    p = "structured_outputs"
    if not isinstance(so, dict):
        raise InvalidRequestError(f"'{p}' must be an object", p)
    unknown = set(so) - set(_KINDS) - _OPTIONS
    if unknown:
        raise InvalidRequestError(f"'{p}' has unsupported fields: {', '.join(sorted(unknown))}", p)
    for name in _OPTIONS:
        if so.get(name) is not None and not isinstance(so[name], bool):
            raise InvalidRequestError(f"'{p}.{name}' must be a boolean", p)
    kinds = {k: so[k] for k in _KINDS if so.get(k) is not None}
    # vLLM's xgrammar backend allows no properties beyond the schema's unless told otherwise.
    return StructuredOutputsParams(
        **kinds,
        strict=so.get("disable_additional_properties") is not False,
        disable_any_whitespace=bool(so.get("disable_any_whitespace")),
        param=p,
    )
