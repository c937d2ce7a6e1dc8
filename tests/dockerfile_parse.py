"""Just enough Dockerfile parsing for the tests: instructions with continuations joined, exec-form JSON."""

import json
import pathlib


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):  # a comment inside a continued instruction
            continue
        buf += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            op, _, rest = buf.strip().partition(" ")
            out.append((op.upper(), rest.strip()))
            buf = ""
    return out


def last(path: pathlib.Path, op: str) -> str:
    """The value of the final stage's last `op` instruction."""
    ins = instructions(path)
    final = max(i for i, (o, _) in enumerate(ins) if o == "FROM")
    return [v for o, v in ins[final:] if o == op][-1]


def command(path: pathlib.Path) -> list[str]:
    """ENTRYPOINT + CMD of the final image (both in exec form)."""
    return json.loads(last(path, "ENTRYPOINT")) + json.loads(last(path, "CMD"))
