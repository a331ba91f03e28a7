"""What a config error from jsonargparse lacks: the YAML file it came from, and the key meant.

`config_hint(text, argv, roots)` returns the extra words for the one-line error of
`flowtracer fit|validate|sft`: for an unknown key, the --config file that holds it and the closest
valid key ("did you mean 'model.sampling'"); for a file YAML cannot read, its name and (for tabs)
that YAML indents with spaces. `roots` maps the top-level sections to the classes they configure.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import typing
from pathlib import Path
from typing import Any

import yaml

_UNKNOWN = re.compile(r"does not accept option '([^']+)'|Key \"([^\"]+)\" is not expected"
                      r"|unrecognized arguments: --([\w.]+)")


def config_files(argv: list[str]) -> list[Path]:
    """The files given with --config / -c, in order."""
    files = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if arg in ("--config", "-c") and i + 1 < len(argv) else None
        value = arg.split("=", 1)[1] if arg.startswith("--config=") else value
        if value and Path(value).is_file():
            files.append(Path(value))
    return files


def _options(cls: Any) -> dict[str, Any]:
    """name -> annotation of the settings a class (its __init__) or dataclass takes."""
    if dataclasses.is_dataclass(cls):
        hints = typing.get_type_hints(cls)
        return {f.name: hints.get(f.name) for f in dataclasses.fields(cls)}
    try:
        params = inspect.signature(cls.__init__).parameters
        hints = typing.get_type_hints(cls.__init__)
    except (TypeError, ValueError, NameError):
        return {}
    skip = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    return {n: hints.get(n) for n, p in params.items() if n != "self" and p.kind not in skip}


def _settings_class(annotation: Any) -> Any:
    """The dataclass an annotation names (also inside Optional[...]), else None."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if dataclasses.is_dataclass(candidate):
            return candidate
    return None


def closest_key(key: str, roots: dict[str, Any]) -> str | None:
    """The valid dotted key closest to `key`, correcting its first unknown part."""
    parts, cls, good = key.split("."), None, []
    options: dict[str, Any] = {name: None for name in roots}
    for part in parts:
        if part not in options:
            close = difflib.get_close_matches(part, list(options), n=1, cutoff=0.6)
            return ".".join([*good, close[0]]) if close else None
        good.append(part)
        cls = roots.get(part) if len(good) == 1 else _settings_class(options[part])
        if cls is None:
            return None
        options = _options(cls)
    return None


def _holds(data: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(data, dict) or part not in data:
            return False
        data = data[part]
    return True


def config_hint(text: str, argv: list[str], roots: dict[str, Any]) -> str:
    """Words naming the file and the fix for a jsonargparse error text ("" when there is nothing to add)."""
    files = config_files(argv)
    for path in files:  # a file YAML cannot read: name it (jsonargparse says "<unicode string>")
        raw = path.read_text(encoding="utf-8", errors="replace")
        try:
            yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            tabs = "; YAML indents with spaces, not tabs" if "\t" in raw else ""
            return f"{path}{where} is not valid YAML{tabs}"
    found = _UNKNOWN.search(text)
    if not found:
        return ""
    key = found.group(1) or found.group(2) or found.group(3)
    holder = next((str(p) for p in reversed(files) if _holds(yaml.safe_load(p.read_text()), key)), None)
    meant = closest_key(key, roots)
    words = [f"'{key}' is set in {holder}" if holder else ""]
    words.append(f"did you mean '{meant}'" if meant else "")
    return "; ".join(w for w in words if w)
