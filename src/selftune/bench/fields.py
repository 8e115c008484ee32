"""The fields of what ``bench`` reads back from its results folder, checked where it is read.

``results.jsonl`` and ``overhead.json`` are files a person may edit, merge or damage.  The
report and a resume read their fields as the runner wrote them: a field missing, null or of
another type made a traceback deep in the report (``'str' object`` ..., ``unhashable type``), or
a message that named no file, or a contradiction ("a budget of 60 steps, and these have 60", the
second a string).  Each record is checked once, as it is read, so that a bad one is named by its
file and line and the rest of the code may trust the types.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path


class Damaged(ValueError):
    """A file of the results folder that is not what ``bench`` wrote: exit status 1, a failure
    found, as ``verify``'s of a damaged log (a ``ValueError`` otherwise is the command line's
    usage, status 2)."""


#: what a field must be, in words, and the test of a value
Kind = tuple[str, Callable[[object], bool]]


def is_number(value: object) -> bool:
    """Whether ``value`` is a finite number as JSON reads it.

    NaN and infinity are damage: ``json.loads`` reads ``NaN``, ``Infinity`` and ``1e999`` as
    floats, but ``bench`` never writes them (a run that misses its target records null, a value
    that is not finite is recorded as null), and the report counted a NaN steps to target as a
    hit with a median of anything, an infinite one as a hit whose median was a miss."""
    if isinstance(value, bool):  # JSON's true is no 1
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


TEXT: Kind = ("text", lambda value: isinstance(value, str))
WHOLE: Kind = ("a whole number", lambda value: isinstance(value, int) and is_number(value))
NUMBER: Kind = ("a finite number", is_number)
FLAG: Kind = ("true or false", lambda value: isinstance(value, bool))


def or_null(kind: Kind) -> Kind:
    """``kind``, or null (JSON's None)."""
    what, test = kind
    return f"{what} or null", lambda value: value is None or test(value)


def fault(
    item: object, fields: Mapping[str, Kind], optional: Mapping[str, Kind] | None = None
) -> str | None:
    """What is wrong with ``item`` as a JSON object holding ``fields`` (and, where present,
    ``optional``), in words for an error message; None when nothing is."""
    if not isinstance(item, dict):
        return f"it is {_shown(item)}, not an object of fields"
    missing = [name for name in fields if name not in item]
    if missing:
        return f"it has no {', '.join(missing)}"
    for name, (what, test) in {**fields, **(optional or {})}.items():
        if name in item and not test(item[name]):
            return f"its {name} is {_shown(item[name])}, not {what}"
    return None


def _shown(value: object, limit: int = 40) -> str:
    """``value`` as JSON writes it, cut short: a message quotes it, never a whole curve."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_text(path: Path) -> str:
    """The text of a file of the results folder; one that cannot be read as text (a folder in
    its place, no permission, bytes that are not UTF-8) is an error naming it, not a
    traceback."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise Damaged(
            f"{path} is not UTF-8 text (byte {exc.start}): it was damaged; restore it from a copy"
        ) from None
    except OSError as exc:  # a folder where the file goes, say
        raise Damaged(
            f"{path} cannot be read ({exc.strerror or exc}); make it a file bench can read, or "
            "move it out of the way"
        ) from None
