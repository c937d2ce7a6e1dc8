"""The CRD's openAPIV3Schema as the API server uses it: defaulting, schema validation, CEL rules.

Shared by the pure tests and the emulated API server, so both judge CRs exactly like the CRD says.
"""

import copy
import pathlib

import celpy
import jsonschema
import yaml

CRD_PATH = pathlib.Path(__file__).parents[2] / "crds" / "inferenceservice.yaml"


def load_crd(path: pathlib.Path = CRD_PATH) -> dict:
    return yaml.safe_load(path.read_text())


def version_schema(crd: dict, version: str | None = None) -> dict:
    v = next(v for v in crd["spec"]["versions"] if version in (None, v["name"]))
    return v["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict, obj):
    """Structural defaulting: absent properties with a `default` get it, recursively (as the apiserver)."""
    if not isinstance(obj, dict) or schema.get("type") != "object":
        if isinstance(obj, list) and "items" in schema:
            return [apply_defaults(schema["items"], x) for x in obj]
        return obj
    out = dict(obj)
    for key, sub in schema.get("properties", {}).items():
        if key not in out and "default" in sub:
            out[key] = copy.deepcopy(sub["default"])
        if key in out:
            out[key] = apply_defaults(sub, out[key])
    return out


def _cel_errors(schema: dict, value, path: str) -> list[str]:
    """Evaluates x-kubernetes-validations bottom-up, like the apiserver (standard CEL only)."""
    errors = []
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += _cel_errors(sub, value[key], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, x in enumerate(value):
            errors += _cel_errors(schema["items"], x, f"{path}[{i}]")
    env = celpy.Environment()
    for rule in schema.get("x-kubernetes-validations", []):
        program = env.program(env.compile(rule["rule"]))
        if not program.evaluate({"self": celpy.json_to_cel(value)}):
            errors.append(f"{path}: Invalid value: {rule.get('message', rule['rule'])}")
    return errors


def validation_errors(schema: dict, obj: dict) -> list[str]:
    """Empty when the (already defaulted) object is valid; else apiserver-like messages."""
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in validator.iter_errors(obj)]
    if errors:  # CEL only runs on schema-valid objects
        return errors
    return _cel_errors(schema.get("properties", {}).get("spec", {}), obj.get("spec"), "spec")


def default_spec(spec: dict | None = None) -> dict:
    """A spec as the operator receives it from the API server: defaults filled in."""
    schema = version_schema(load_crd())
    return apply_defaults(schema, {"spec": spec or {}})["spec"]
