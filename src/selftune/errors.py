"""Errors that selftune raises on purpose, each naming the bad value and what to do about it."""

from __future__ import annotations


class SelfTuneError(ValueError):
    """Base class: a problem with what the caller passed or with the state of a run."""


class ConfigError(SelfTuneError):
    """An argument to :func:`selftune.wrap` (or a policy, or a controller) is out of range."""


class GuardError(RuntimeError):
    """The guard saw trouble repeat after rolling back and backing off; the run cannot go on.

    The message names the step, the signal and its value.  The run folder (if any) holds the log of
    every guard event up to this point.
    """
