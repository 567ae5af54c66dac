"""Write ``docs/api.md``, the API reference, from the docstrings of the public API.

::

    python scripts/gen_api_docs.py           # (re)write docs/api.md
    python scripts/gen_api_docs.py --check   # exit 1 when docs/api.md is out of date

Docstrings are numpy style (``Parameters`` / ``Returns`` / ``Raises`` sections under dashed
underlines); sections become bold headings and their ``name : type`` entries list items.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
#: what a notebook user reaches for, in reading order
PUBLIC = [
    "fmri2text.api.Decoder",
    "fmri2text.data.preprocessing.Trials",
    "fmri2text.export.export_run_model",
    "fmri2text.model_folder.FORMAT_VERSION",
    "fmri2text.config.load_config",
    "fmri2text.pipeline.run_pipeline",
    "fmri2text.errors.UserError",
]
_SECTION = re.compile(r"^(\w[\w ]*)\n-{3,}$", re.M)
_ROLE = re.compile(r":(?:meth|func|class|mod|data|attr):`([^`]+)`")


def _resolve(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default(value) -> str:
    if callable(value) and hasattr(value, "__name__"):
        return value.__name__  # no memory addresses: the output must be stable
    return repr(value)


def _annotation(value) -> str:
    """An annotation as written in the source (``from __future__ import annotations``)."""
    return value.strip("'\"") if isinstance(value, str) else inspect.formatannotation(value)


def _signature(obj) -> str:
    """``(a: type = default, *, b: type)`` with annotations as written in the source."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parts, star = [], False
    for p in sig.parameters.values():
        if p.name in ("self", "cls"):
            continue
        if p.kind is p.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        text = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "") + p.name
        if p.kind is p.VAR_POSITIONAL:
            star = True
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {_default(p.default)}"
        parts.append(text)
    ret = sig.return_annotation
    arrow = "" if ret is sig.empty else f" -> {_annotation(ret)}"
    return f"({', '.join(parts)}){arrow}"


def _docstring(obj) -> str:
    """The docstring in markdown: numpy sections as headings, entries as list items."""
    doc = inspect.getdoc(obj) or ""
    out, section = [], None
    lines = doc.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and _SECTION.match(f"{line}\n{lines[i + 1]}"):
            section = line.strip()
            out += ["", f"**{section}**", ""]
            i += 2
            continue
        if section and line and not line.startswith(" "):
            name, _, kind = line.partition(":")
            kind = kind.strip()
            out.append(f"- `{name.strip()}`" + (f" ({kind})" if kind else ""))
        elif section and line.startswith(" "):
            out.append("  " + line.strip())
        else:
            out.append(line)
        i += 1
    text = "\n".join(out).replace("::\n", ":\n")
    text = _ROLE.sub(lambda m: f"`{m.group(1).lstrip('~')}`", text).replace("``", "`")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _members(cls) -> list[tuple[str, object]]:
    """Public methods and properties defined on ``cls`` itself, in source order."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (classmethod, staticmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


def render() -> str:
    import fmri2text

    parts = ["# API reference", "",
             "Generated from the docstrings by `scripts/gen_api_docs.py`; do not edit by hand. "
             "`from fmri2text import Decoder` is the entry point; "
             "`examples/decode_a_run.py` and `examples/train_on_your_bids.py` show it at work.", ""]
    for dotted in PUBLIC:
        obj = _resolve(dotted)
        name = dotted.rpartition(".")[2]
        short = f"fmri2text.{name}" if name in fmri2text.__all__ else dotted  # as users import it
        if inspect.isclass(obj):
            signature = _signature(obj).removesuffix(" -> None")
            parts += [f"## class `{short}{signature}`", "", _docstring(obj), ""]
            for name, member in _members(obj):
                if isinstance(member, property):
                    parts += [f"### property `{obj.__name__}.{name}`", "", _docstring(member.fget), ""]
                else:
                    parts += [f"### `{obj.__name__}.{name}{_signature(member)}`", "",
                              _docstring(member), ""]
        elif callable(obj):
            parts += [f"## `{short}{_signature(obj)}`", "", _docstring(obj), ""]
        else:
            parts += [f"## `{short} = {obj!r}`", ""]
            comment = _constant_comment(dotted)
            if comment:
                parts += [comment, ""]
    return "\n".join(parts).rstrip() + "\n"


def _constant_comment(dotted: str) -> str:
    """The ``#:`` comment above a module constant."""
    module, _, name = dotted.rpartition(".")
    source = inspect.getsource(importlib.import_module(module)).splitlines()
    for i, line in enumerate(source):
        if line.startswith(f"{name} ="):
            comments = []
            for prev in reversed(source[:i]):
                if not prev.startswith("#:"):
                    break
                comments.insert(0, prev[2:].strip())
            return " ".join(comments)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/api.md from the docstrings.")
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.is_file() or OUT.read_text(encoding="utf-8") != text:
            print(f"{OUT} is out of date: run python scripts/gen_api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
