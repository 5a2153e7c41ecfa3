"""Readable messages for pydantic validation errors, for HTTP clients.

pydantic says ``messages.0.content.str: Input should be a valid string`` and then, for the same
value, ``messages.0.content.list[TextPart]: Input should be a valid list``: one error per member
of a union, with the member's type name in the location. ``readable_error`` turns a list of such
errors into one ``(param, message)``:

- ``param`` is the field as a client writes it: ``messages[0].content``, ``logit_bias`` (union
  member names and pydantic's ``[key]`` markers removed);
- the errors of one union are collapsed: if the value got past a member's type check (a list
  whose item is wrong), that member's error is the one reported, at its place
  (``stop[1]: must be a string``); if it matched no member, the message lists what it may be
  (``messages[0].content: must be a string or a list of text parts``);
- the message says what the value must be, in words, with the bound when there is one.

A location element is a union member's name, not a field, when the value at that point of the
request body is not an object that has it as a key: the body decides, not the look of the name.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

_MISSING = object()

# Errors that only say "the value is not of this member's type" (no deeper place to point at).
_TYPE_MISMATCH = {
    "string_type", "int_type", "int_parsing", "float_type", "float_parsing", "bool_type", "bool_parsing",
    "list_type", "dict_type", "model_type", "model_attributes_type", "none_required", "literal_error",
    "is_instance_of", "tuple_type", "set_type", "int_from_float", "bytes_type", "arguments_type",
}
_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false", "none": "null",
          "dict": "an object", "list": "a list", "any": "any value"}
_PLURAL = {"str": "strings", "int": "integers", "float": "numbers", "bool": "booleans", "dict": "objects",
           "any": "values"}


def field_path(loc: Sequence[Any]) -> str | None:
    """``("messages", 0, "content")`` -> ``messages[0].content``; None for the body itself."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def _split(loc: Sequence[Any], body: Any) -> tuple[list[Any], int | None, str | None, bool]:
    """(path without union members and markers, index in the path where the first union member
    was, that member's name, whether the location goes on past that member)."""
    path: list[Any] = []
    at, member, deeper = None, None, False
    value = _MISSING if body is None else body
    for k, part in enumerate(loc):
        if part == "[key]":  # pydantic's marker after a dict key that failed: the key is in path
            continue
        if isinstance(part, int) and (isinstance(value, list) or value is _MISSING):
            value = value[part] if isinstance(value, list) and 0 <= part < len(value) else _MISSING
            path.append(part)
        elif isinstance(part, str) and (
                (isinstance(value, dict) and (part in value or _looks_like_field(part)))
                or (value is _MISSING and _looks_like_field(part))):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
            path.append(part)
        elif at is None:  # a union member's name: the value stays where it is
            at, member, deeper = len(path), str(part), k < len(loc) - 1
    return path, at, member, deeper


def _looks_like_field(part: str) -> bool:
    """A missing key inside an object (``messages[0].role`` absent) vs. a member name (``TextPart``,
    ``list[str]``): fields here are snake_case identifiers."""
    return re.fullmatch(r"[a-z_][a-z0-9_]*", part) is not None and part not in _WORDS


def _args(text: str) -> list[str]:
    """The top-level comma-separated parts of ``text`` (brackets nest)."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "[") - (ch == "]")
        cur += ch
    return out + [cur.strip()]


def _member_words(member: str, plural: bool = False) -> str:
    """``list[TextPart]`` -> ``a list of text parts``; ``str`` -> ``a string``."""
    m = re.fullmatch(r"([\w-]+)\[(.*)\]", member)
    if m:
        head, args = m.group(1), _args(m.group(2))
        if head == "dict":
            return "objects" if plural else "an object"
        if head in ("list", "tuple", "set", "frozenset"):
            return ("lists of " if plural else "a list of ") + _member_words(args[-1], plural=True)
        if head == "literal":
            return "one of " + ", ".join(args)
        # validator and constraint wrappers (function-after[f(), TextPart], nullable[str]): the type inside
        return _member_words(args[-1], plural)
    m = re.fullmatch(r"constrained-(\w+)", member)
    if m:
        member = m.group(1)
    if member in _WORDS:
        return _PLURAL.get(member, _WORDS[member]) if plural else _WORDS[member]
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", member).lower()  # a model: TextPart -> text part
    return words + "s" if plural else ("an " if words[:1] in "aeiou" else "a ") + words


def _phrase(err: dict[str, Any]) -> str:
    """What one error says the value must be."""
    kind, ctx = err.get("type", ""), err.get("ctx") or {}
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known field"
    if kind == "value_error":
        return str(ctx.get("error") or err.get("msg", "is invalid"))
    if kind == "assertion_error":
        return str(ctx.get("error") or err.get("msg", "is invalid"))
    simple = {
        "string_type": "must be a string", "int_type": "must be an integer", "int_parsing": "must be an integer",
        "int_from_float": "must be an integer", "float_type": "must be a number", "float_parsing": "must be a number",
        "bool_type": "must be true or false", "bool_parsing": "must be true or false", "list_type": "must be a list",
        "dict_type": "must be an object", "model_type": "must be an object", "model_attributes_type": "must be an object",
        "finite_number": "must be a finite number", "none_required": "must be null", "json_type": "must be JSON",
        "string_unicode": "must be valid UTF-8 text", "missing_argument": "is required",
    }
    if kind in simple:
        return simple[kind]
    bounds = {"greater_than_equal": ("ge", ">="), "greater_than": ("gt", ">"), "less_than_equal": ("le", "<="),
              "less_than": ("lt", "<"), "multiple_of": ("multiple_of", "a multiple of")}
    if kind in bounds:
        key, op = bounds[kind]
        return f"must be {op} {ctx.get(key)}"
    if kind == "too_short":
        n = ctx.get("min_length")
        return f"must have at least {n} item{'s' if n != 1 else ''}"
    if kind == "too_long":
        n = ctx.get("max_length")
        return f"must have at most {n} item{'s' if n != 1 else ''}"
    if kind == "string_too_short":
        n = ctx.get("min_length")
        return "must not be empty" if n == 1 else f"must have at least {n} characters"
    if kind == "string_too_long":
        return f"must have at most {ctx.get('max_length')} characters"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}"
    if kind == "enum":
        return f"must be {ctx.get('expected')}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}"
    msg = str(err.get("msg") or "is invalid")
    return msg[:1].lower() + msg[1:]


def readable_error(errors: Sequence[dict[str, Any]], body: Any = None,
                   prefix: Sequence[str] = ("body",)) -> tuple[str | None, str]:
    """``(param, message)`` for the first problem in ``errors`` (pydantic's ``ValidationError.errors()``
    or FastAPI's ``RequestValidationError.errors()``), with the request ``body`` they are about.
    ``prefix``: location elements that name the request part rather than a field (FastAPI's ``body``)."""
    errors = [dict(e) for e in errors]
    if not errors:
        return None, "invalid request"
    for e in errors:
        loc = list(e.get("loc") or ())
        while loc and loc[0] in prefix:
            loc.pop(0)
        e["_loc"] = loc
    first = errors[0]
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error")
        return None, "request body is not valid JSON" + (f" ({why})" if why else "")
    split = [_split(e["_loc"], body) for e in errors]
    path, at, _, _ = split[0]
    if at is not None:
        # The errors of this union: same place before the member names, a member name there.
        siblings = [(e, s) for e, s in zip(errors, split) if s[1] == at and s[0][:at] == path[:at]]
        informative = [(e, s) for e, s in siblings if s[3] or e.get("type") not in _TYPE_MISMATCH]
        if informative:
            first, (path, _, _, _) = informative[0]
        else:
            members = list(dict.fromkeys(s[2] for _, s in siblings if s[2]))
            param = field_path(path[:at])
            what = " or ".join(_member_words(m) for m in members)
            return param, f"{param}: must be {what}" if param else f"request body must be {what}"
    param = field_path(path)
    if param is None:
        kind = first.get("type")
        if kind == "missing":
            return None, "request body is required (a JSON object)"
        if kind in ("model_attributes_type", "dict_type", "model_type"):
            return None, "request body must be a JSON object"
        return None, f"request body {_phrase(first)}"
    if first.get("type") == "int_parsing" and path and isinstance(path[-1], str) \
            and "[key]" in (first.get("loc") or ()):
        parent = field_path(path[:-1])
        return parent, f"{parent}: keys must be integers, got {path[-1]!r}"
    return param, f"{param}: {_phrase(first)}"
