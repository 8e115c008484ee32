"""``off``: reads the signals and logs nothing but guard events; never changes a knob.

The control arm of every comparison: same wrapper, same signals, same guard, no tuning.
"""

from __future__ import annotations

from typing import Any

from selftune.controllers.base import Knobs, Proposal
from selftune.signals import Signals


class OffController:
    """Proposes nothing."""

    name = "off"
    reads_buffer = False  #: whether it needs the momentum-buffer alignment signal

    def propose(self, signals: Signals, knobs: Knobs) -> list[Proposal]:
        return []

    def on_backoff(self, step: int) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
