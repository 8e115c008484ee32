"""Fake run folders and a headless Chromium, for the report and watch tests.

:class:`FakeRun` writes a run folder the way the tuner does (manifest, hash-chained
``decisions.jsonl``, ``trace.jsonl``) with nothing but json and hashlib, so these tests do not
depend on the tuner or on the audit module they check against. :func:`realistic_run` fills one
with a few hundred steps that look like real training: a falling loss, a learning rate that
grows then settles, momentum changes, a clipped decision and a guard rollback.

Run as a script to regenerate the screenshot in the docs from such a run, or from a real run
folder given after it (its report.html and plots/ are rewritten)::

    .venv/bin/python tests/browser.py docs/report-screenshot.png [RUN]
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
GENESIS = "0" * 64


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def decision_record(
    step: int,
    group: int,
    knob: str,
    old: float,
    new: float,
    reason: str,
    clipped: bool = False,
    **signals: Any,
) -> dict[str, Any]:
    """A decision as the tuner logs it; ``value`` is the new effective value here."""
    return dict(
        kind="decision",
        step=step,
        group=group,
        knob=knob,
        old=old,
        new=new,
        value=new,
        signals=signals,
        reason=reason,
        clipped=clipped,
    )


def guard_record(
    step: int, event: str, signal: str, value: Any, reason: str, **extra: Any
) -> dict[str, Any]:
    """A guard event as the tuner logs it (``extra``: restored_step, lr_factor, ...)."""
    return dict(
        kind="guard", step=step, event=event, signal=signal, value=value, reason=reason, **extra
    )


class FakeRun:
    """A run folder written record by record, as a training run in progress would write it."""

    def __init__(self, folder: Path, knobs: Sequence[Sequence[str]] = (("lr", "momentum"),)):
        self.folder = folder
        self.knobs = [list(group) for group in knobs]
        self.seq = 0
        self.head = GENESIS
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": "selftune-audit/1",
            "selftune": "0.1.0",
            "torch": "2.13.0",
            "python": "3.11.2",
            "created": "2025-01-01T12:00:00+00:00",
            "controller": "auto",
            "config": {"optimizer": "SGD", "policy": {"lr": {"min": 1e-5, "max": 1.0}}},
            "seed": 0,
            "param_count": 1234 * len(self.knobs),
            "param_groups": [
                {"index": i, "knobs": group, "num_params": 1234}
                for i, group in enumerate(self.knobs)
            ],
            "initial_params_sha256": hashlib.sha256(b"weights").hexdigest(),
        }
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
        (folder / "decisions.jsonl").touch()

    def record_line(self, record: dict[str, Any]) -> bytes:
        """Chain ``record`` (seq, prev, hash) and return its line; the caller writes it."""
        stored = {**record, "seq": self.seq, "prev": self.head}
        stored["hash"] = hashlib.sha256(_canonical(stored)).hexdigest()
        self.seq += 1
        self.head = stored["hash"]
        return _canonical(stored) + b"\n"

    def append(self, record: dict[str, Any]) -> None:
        with open(self.folder / "decisions.jsonl", "ab") as file:
            file.write(self.record_line(record))

    def decision(
        self,
        step: int,
        group: int,
        knob: str,
        old: float,
        new: float,
        reason: str,
        clipped: bool = False,
        **signals: Any,
    ) -> None:
        self.append(decision_record(step, group, knob, old, new, reason, clipped, **signals))

    def guard(self, step: int, event: str, signal: str, value: Any, reason: str, **extra: Any):
        self.append(guard_record(step, event, signal, value, reason, **extra))

    def trace(self, step: int, loss: float | str | None, hp: list[dict[str, float]]) -> None:
        line = json.dumps({"step": step, "loss": loss, "hp": hp}) + "\n"
        with open(self.folder / "trace.jsonl", "a", encoding="utf-8") as file:
            file.write(line)


def realistic_run(folder: Path, steps: int = 300, seed: int = 0) -> FakeRun:
    """A two-group SGD run: the controller grows lr, cuts it near a spike, the guard rolls back."""
    rng = random.Random(seed)
    run = FakeRun(folder, knobs=(("lr", "momentum"), ("lr", "momentum")))
    hp = [{"lr": 0.01, "momentum": 0.9}, {"lr": 0.001, "momentum": 0.9}]
    spike = steps * 3 // 5
    loss_ema = 2.3
    for step in range(steps):
        base = 0.15 + 2.2 * math.exp(-step / (steps / 5))
        loss: float | str = base * math.exp(rng.gauss(0, 0.12))
        if step == spike:
            loss = "inf"
            run.guard(
                step,
                "rollback",
                "loss",
                "inf",
                "loss is inf: restored the last good weights and halved every learning rate",
                restored_step=step - 10,
            )
            for group in range(2):
                old = hp[group]["lr"]
                hp[group]["lr"] = old / 2
                run.decision(step, group, "lr", old, old / 2, "guard rollback: halve the rate")
        elif step == spike + 40:
            run.guard(
                step,
                "skip",
                "grad_norm",
                912.5,
                "gradient norm 912.5 is 14 sigma above its running mean: step skipped",
            )
        elif step % 10 == 5 and step < spike:
            for group in range(2):
                old = hp[group]["lr"]
                grow = step < steps // 3
                if grow and old >= 0.2:  # at the policy's bound already: nothing to decide
                    continue
                new = min(old * (1.5 if grow else 0.9), 0.2)
                clipped = new == 0.2
                hp[group]["lr"] = new
                cos = rng.uniform(0.2, 0.6) if grow else rng.uniform(-0.5, -0.1)
                reason = (
                    f"gradient agrees with the last update (cos {cos:.2f}): grow"
                    if grow
                    else f"gradient opposes the last update (cos {cos:.2f}): shrink"
                )
                run.decision(
                    step,
                    group,
                    "lr",
                    old,
                    new,
                    reason,
                    clipped,
                    loss=loss,
                    loss_ema=loss_ema,
                    cos_update=cos,
                    grad_norm=rng.uniform(1, 3),
                )
        elif step % 50 == 30 and hp[0]["momentum"] < 0.98:
            old = hp[0]["momentum"]
            hp[0]["momentum"] = round(min(old + 0.02, 0.98), 4)
            run.decision(
                step,
                0,
                "momentum",
                old,
                hp[0]["momentum"],
                "loss falls steadily: more momentum",
                loss=loss,
            )
        if isinstance(loss, float):
            loss_ema = 0.9 * loss_ema + 0.1 * loss
        run.trace(step, loss, [dict(group) for group in hp])
    return run


# --------------------------------------------------------------------------- Chromium


def chromium_missing() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    missing = [str(path) for path in (CHROMIUM, CHROMEDRIVER) if not path.exists()]
    if missing:
        return (
            f"{' and '.join(missing)} not installed: "
            "apt-get install -y chromium chromium-driver to run the browser test"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[dev]'"
    return None


@contextlib.contextmanager
def chromium(profile: Path, width: int = 1280, height: int = 1000) -> Iterator[Any]:
    """A headless Chromium driven by selenium, with a fresh profile and the console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.set_page_load_timeout(60)
        yield driver
    finally:
        driver.quit()


#: every <img>: whether it finished loading and its decoded width (0 for a broken image)
IMAGES_JS = (
    "return Array.from(document.images).map("
    "i => ({src: i.src.slice(0, 40), complete: i.complete, width: i.naturalWidth}));"
)


def screenshot_report(page: Path, out: Path, max_height: int = 2600) -> None:
    """Save a screenshot of the top of ``page`` (the summary, guard events and plots)."""
    with tempfile.TemporaryDirectory() as profile, chromium(Path(profile)) as driver:
        driver.get(page.resolve().as_uri())
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(int(height), max_height))
        driver.execute_script("document.documentElement.style.overflow = 'hidden'")  # scrollbar
        driver.save_screenshot(str(out))


def main(argv: list[str]) -> int:
    """Write the screenshot for the docs from a real run folder, or else a realistic fake run."""
    if len(argv) not in (1, 2):
        print("usage: python tests/browser.py OUT.png [RUN]", file=sys.stderr)
        return 2
    reason = chromium_missing()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    from selftune.report import write_report

    out = Path(argv[0])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(argv[1]) if len(argv) == 2 else Path(tmp) / "mnist1d-sgd"
        if len(argv) == 1:
            realistic_run(folder)
        screenshot_report(write_report(folder), out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
