"""Text from a run folder as a terminal shows it: seen, never obeyed.

A run folder is a file anyone may hand you, and what it holds (a decision's reason, a note, a
knob's, signal's or controller's name, the names of its folders) reaches the terminal through
``selftune watch``, ``report`` and ``verify``. A terminal obeys the control characters among
them: ``"\\x1b[2J"`` clears the screen, ``"\\r"`` writes over the start of the line, an OSC
sequence sets the window's title, so a log could hide what it holds or show what it does not.
rich, which draws the watch, drops a few (``\\r``, the bell) and passes ESC and the C1 codes on.
Every line these commands print passes through :func:`printable`.
"""

from __future__ import annotations


def printable(value: object) -> str:
    """``str(value)`` with every character that is not printable written as Python's repr writes
    it (``\\x1b``, ``\\r``, ``\\n``, ``\\x9b``, ``\\u202e``), and the rest, letters of any
    script included, as it is.

    ``str.isprintable`` decides, as for repr: besides the C0 and C1 controls it refuses the
    format characters that reorder what a line shows (a bidi override) and lone surrogates (which
    a UTF-8 terminal cannot be written). A newline is escaped too: what is shown this way is one
    line of a message or one cell of a frame, where a logged newline would forge the next line.
    """
    text = str(value)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)
