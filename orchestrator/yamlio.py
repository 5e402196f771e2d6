"""The one reader of every YAML file a user gives bnnctl: study and tuning specs, ``--config``
training and model files, and ``--set KEY=VALUE`` values.

What it accepts (and the README documents):

- a regular file of at most :data:`MAX_BYTES`, UTF-8 (a BOM is fine); binary content, NUL bytes,
  other encodings and special files (a FIFO, ``/dev/zero``) are refused with one message;
- plain YAML data: mappings with plain string keys, lists, scalars. Tags (``!!python/...``,
  ``!!str``, ``!custom``) are refused wherever they appear, and so are complex keys (``? [a, b]``);
- anchors, aliases and merge keys (``<<: *base``, keys written beside it win), with at most
  :data:`MAX_NODES` values after expansion and :data:`MAX_DEPTH` levels of nesting, so an alias
  bomb or a recursive alias is refused at once;
- scalars resolved as YAML 1.2's core schema: ``1e-3``, ``1E5``, ``.5``, ``-2e-4`` are floats
  (YAML 1.1, PyYAML's default, reads some of them as strings); ``true``/``false`` (any case
  variant YAML 1.2 allows) are booleans and ``yes``/``no``/``on``/``off`` stay strings; ``~`` and
  ``null`` are null; ``.inf`` and ``.nan`` parse but are refused as values (no setting takes them).

Every error names the file, the line and the field.
"""
from __future__ import annotations

import math
import os
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from .errors import SpecError

MAX_BYTES = 1 << 20  # 1 MiB: the largest shipped spec is ~3 KB
MAX_DEPTH = 64  # levels of nesting
MAX_NODES = 100_000  # values after alias expansion
MAX_INT_DIGITS = 100  # an integer longer than this is refused by the reader (Python refuses > 4300)

_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$")
_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 core-schema scalars (see the module docstring)."""


_Loader.yaml_implicit_resolvers = {}  # none of YAML 1.1's (its floats, ints, bools, sexagesimals)
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", _BOOL, list("tTfF"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:int", _INT, list("-+0123456789"))
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))
_Loader.add_implicit_resolver("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""])


def _scalar(node: yaml.ScalarNode) -> Any:
    """A scalar by the core schema: the implicit tag was resolved by :class:`_Loader`."""
    tag, text = node.tag, node.value
    if tag.endswith(":bool"):
        return text.lower() == "true"
    if tag.endswith(":int"):
        if text.startswith(("0o", "0x")):
            return int(text[2:], 8 if text[1] == "o" else 16)
        return int(text)
    if tag.endswith(":float"):
        return float(text.replace(".inf", "inf").replace(".Inf", "inf").replace(".INF", "inf")
                     .replace(".nan", "nan").replace(".NaN", "nan").replace(".NAN", "nan"))
    if tag.endswith(":null"):
        return None
    return text


def _read_text(path: Path, what: str) -> str:
    try:
        st = os.stat(path)  # follows a symlink: what matters is what it points to
    except FileNotFoundError:
        raise SpecError(str(path), "", "file not found") from None
    except OSError as err:
        raise SpecError(str(path), "", f"cannot read the file: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise SpecError(str(path), "", f"not a regular file; a {what} is a YAML text file")
    if st.st_size > MAX_BYTES:
        raise SpecError(str(path), "", f"the file is {st.st_size} bytes; a {what} may be at most {MAX_BYTES} bytes")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as err:
        raise SpecError(str(path), "", f"cannot read the file: {err.strerror}") from None
    if len(raw) > MAX_BYTES:
        raise SpecError(str(path), "", f"a {what} may be at most {MAX_BYTES} bytes")
    if b"\0" in raw:
        raise SpecError(str(path), "", f"the file holds NUL bytes (binary data, or UTF-16); a {what} is UTF-8 "
                        "YAML text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise SpecError(str(path), "", f"not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                        f"save the {what} as UTF-8", line) from None
    return text.removeprefix("\ufeff")


def _check_events(text: str, file: str) -> None:
    """Refuse tags and too deep nesting from the event stream, before anything is built (the
    composer is recursive: 5000 levels would overflow Python's stack)."""
    depth = 0
    try:
        for event in yaml.parse(text, Loader=_Loader):
            tag = getattr(event, "tag", None)
            if tag is not None and tag != "!":
                line = event.start_mark.line + 1
                raise SpecError(file, "", f"YAML tags such as {tag!r} are not allowed; write plain values", line)
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise SpecError(file, "", f"nested more than {MAX_DEPTH} levels deep", event.start_mark.line + 1)
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
    except yaml.YAMLError as err:
        raise _invalid(err, file) from None


def _invalid(err: yaml.YAMLError, file: str) -> SpecError:
    """PyYAML's error as ours: "not valid YAML", with its line."""
    mark = getattr(err, "problem_mark", None)
    return SpecError(file, "", f"not valid YAML: {getattr(err, 'problem', None) or err}", mark.line + 1 if mark else None)


class _Builder:
    """Plain data from composed nodes, recording each path's line; merge keys; limits."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: dict[str, int] = {}
        self.count = 0

    def fail(self, path: str, message: str, node: yaml.Node) -> SpecError:
        return SpecError(self.file, path, message, node.start_mark.line + 1)

    def build(self, node: yaml.Node, path: str, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(path, f"more than {MAX_NODES} values once anchors are expanded (an alias bomb?)", node)
        if depth > MAX_DEPTH:
            raise self.fail(path, f"nested more than {MAX_DEPTH} levels deep (a recursive alias?)", node)
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(v, f"{path}[{i}]", depth + 1) for i, v in enumerate(node.value)]
        if node.tag.endswith(":int") and len(node.value.lstrip("+-")) > MAX_INT_DIGITS:
            raise self.fail(path, f"an integer of {len(node.value.lstrip('+-'))} digits is far beyond any setting's "
                            "range (every integer setting is below 2^63, 19 digits)", node)
        value = _scalar(node)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(path, f"{node.value!r} is not a finite number; no setting takes infinity or NaN", node)
        return value

    def mapping(self, node: yaml.MappingNode, path: str, depth: int) -> dict:
        out: dict[str, Any] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.fail(path, "keys must be plain strings (complex keys such as `? [a, b]` are not allowed)",
                                key_node)
            key = key_node.value
            if key == "<<" and key_node.style is None:  # a merge key (a quoted "<<" is a plain key)
                merged.update(self.merge(value_node, path, depth))
                continue
            child = f"{path}.{key}" if path else str(key)
            if key in out:
                raise self.fail(child, "duplicate key", key_node)
            self.lines[child] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, child, depth + 1)
        return {**merged, **out}  # keys written beside a merge key win

    def merge(self, node: yaml.Node, path: str, depth: int) -> dict:
        sources = node.value if isinstance(node, yaml.SequenceNode) else [node]
        out: dict[str, Any] = {}
        for source in reversed(sources):  # the first mapping listed wins
            if not isinstance(source, yaml.MappingNode):
                raise self.fail(path, "a merge key `<<` takes a mapping (an alias such as *base) or a list of them",
                                source)
            out.update(self.mapping(source, path, depth + 1))
        return out


def read_yaml(path: str | Path, what: str = "study spec") -> tuple[Any, dict[str, int]]:
    """The data of a YAML file and the line (1-based) of every dotted path in it. Raises SpecError
    naming the file, line and field for anything :mod:`this module <bnnctl.orchestrator.yamlio>`
    refuses. An empty file gives None."""
    path = Path(path)
    text = _read_text(path, what)
    _check_events(text, str(path))
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise _invalid(err, str(path)) from None
    if node is None:
        return None, {}
    builder = _Builder(str(path))
    return builder.build(node, ""), builder.lines


def parse_value(raw: str) -> Any:
    """A ``--set KEY=VALUE`` value as a YAML 1.2 scalar or flow collection (``1e-3`` is a float,
    ``[1, 2]`` a list); text that is not valid YAML stays the text."""
    if not raw.strip():
        return raw
    try:
        _check_events(raw, "--set")
        node = yaml.compose(raw, Loader=_Loader)
    except (SpecError, yaml.YAMLError):
        return raw
    if node is None:
        return None
    try:
        return _Builder("--set").build(node, "")
    except SpecError:
        return raw
