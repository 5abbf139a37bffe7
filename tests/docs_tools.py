"""What keeps the docs true: their code blocks, the figures they quote and the config references they hold.

    python tests/docs_tools.py --write      rewrite the generated config references in docs/ (`make docs-reference`)

The checks themselves are `tests/test_docs.py`; this module holds what it and `make docs-reference` share.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC_FILES = [os.path.join(ROOT, "README.md")] + sorted(
    os.path.join(ROOT, "docs", name) for name in os.listdir(os.path.join(ROOT, "docs")) if name.endswith(".md")
)

# A figure quoted in a page: the text just before `<!-- fig FILE KEY FORMAT -->` is the value at KEY (dotted, list
# indices as numbers) of the JSON results FILE, formatted with the Python format string FORMAT.
FIGURE = re.compile(r"(\S+?)\s*<!-- fig (\S+\.json) (\S+) (\S+) -->")
# A generated reference: `<!-- reference CLASS -->` ... `<!-- /reference -->`.
REFERENCE = re.compile(r"(<!-- reference (\w+) -->\n)(.*?)(<!-- /reference -->)", re.S)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)


@dataclass
class Block:
    """A fenced code block of a page: its language, its code and the line it starts on."""

    path: str
    language: str
    code: str
    line: int


def code_blocks(path: str) -> list[Block]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return [
        Block(path, match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1)
        for match in FENCE.finditer(text)
    ]


def figures(path: str) -> Iterator[tuple[str, str, str, str]]:
    """`(quoted text, results file, key, format)` of every figure quoted in the page at `path`."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    for match in FIGURE.finditer(text):
        quoted = match.group(1).lstrip("*(").rstrip("*")
        yield quoted, match.group(2), match.group(3), match.group(4)


def lookup(results_file: str, key: str) -> Any:
    with open(os.path.join(ROOT, results_file), encoding="utf-8") as fh:
        value = json.load(fh)
    for part in _key_parts(key):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


def _key_parts(key: str) -> list[str]:
    """Dotted parts of `key`; a part may itself hold dots when a results file's keys do (`0.3x`): the longest run of
    parts that names a key is taken, as `lookup` walks."""
    return re.split(r"\.(?![0-9]+x_)", key)


def _type_name(hint: Any) -> str:
    return (hint if isinstance(hint, str) else getattr(hint, "__name__", str(hint))).replace("typing.", "")


def config_reference(class_name: str) -> str:
    """The markdown table of a config class's own fields (those it declares or overrides): name, type, default and
    the help its `field(metadata=...)` carries."""
    from iav_trl import AlignmentHeadConfig, EvaluationConfig, IAVConfig

    cls = {"IAVConfig": IAVConfig, "AlignmentHeadConfig": AlignmentHeadConfig, "EvaluationConfig": EvaluationConfig}[
        class_name
    ]
    own = vars(cls).get("__annotations__", {})
    lines = ["| field | type | default | what it does |", "| --- | --- | --- | --- |"]
    for field in dataclasses.fields(cls):
        if field.name not in own:
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "required"
        help_text = field.metadata.get("help", "").replace("|", "\\|")
        # The annotation as written (argparse-based parsers rewrite `field.type` in place when they build a parser).
        type_name = _type_name(own[field.name]).replace("|", "\\|")
        lines.append(f"| `{field.name}` | `{type_name}` | `{default}` | {help_text} |")
    return "\n".join(lines) + "\n"


def rendered(path: str) -> str:
    """The page at `path` with every generated reference regenerated."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return REFERENCE.sub(lambda m: m.group(1) + config_reference(m.group(2)) + m.group(4), text)


def main() -> None:
    if sys.argv[1:] != ["--write"]:
        raise SystemExit(__doc__)
    for path in DOC_FILES:
        text = rendered(path)
        with open(path, encoding="utf-8") as fh:
            if fh.read() == text:
                continue
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        print(f"rewrote {os.path.relpath(path, ROOT)}")


if __name__ == "__main__":
    main()
