"""How a teacher leaves kiosk mode: a PIN from the configuration, typed into a dialog."""

from __future__ import annotations

import contextlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input

from parrot_edge.files import write_atomically
from parrot_edge.kiosk.translated import Translated


class TeacherPin:
    """The configured PIN. Three wrong tries in a row lock it for a minute, so nobody can just try them all.
    The count and the lock are kept in `state_file` (wall-clock time), so restarting the chat (a crash, a
    reboot) does not give a student three more tries."""

    TRIES = 3
    LOCK_SECONDS = 60

    def __init__(self, pin: str | None, state_file: Path | None = None, clock: Callable[[], float] = time.time):
        self._pin = pin or None
        self._clock = clock
        self._state_file = state_file
        self._failures = 0
        self._locked_until = 0.0
        if state_file is not None:
            with contextlib.suppress(OSError, ValueError, TypeError):  # none yet, or unreadable: no tries used
                state = json.loads(state_file.read_text())
                self._failures, self._locked_until = int(state["failures"]), float(state["locked_until"])

    @property
    def is_set(self) -> bool:
        return self._pin is not None

    def locked_seconds(self) -> int:
        return max(0, round(self._locked_until - self._clock()))

    def check(self, attempt: str) -> bool:
        if self._pin is None or self.locked_seconds():
            return False
        if hmac.compare_digest(attempt.encode(), self._pin.encode()):
            self._failures = 0
            self._save()
            return True
        self._failures += 1
        if self._failures >= self.TRIES:
            self._failures = 0
            self._locked_until = self._clock() + self.LOCK_SECONDS
        self._save()
        return False

    def _save(self) -> None:
        if self._state_file is not None:
            with contextlib.suppress(OSError):  # a read-only disk must not stop the teacher from leaving
                state = {"failures": self._failures, "locked_until": self._locked_until}
                write_atomically(self._state_file, json.dumps(state).encode())


class PinScreen(ModalScreen[bool]):
    """Dismissed with True once the right PIN is typed; Esc goes back to the chat."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "dismiss(False)", show=False)]
    DEFAULT_CSS = """
    PinScreen {
        align: center middle;
        background: $background 80%;
        & > Vertical {
            width: 60;
            height: auto;
            padding: 1 2;
            border: ascii $primary;
            background: $background;
        }
        & .title { text-style: bold; color: $primary; margin-bottom: 1; }
        & .feedback { color: $error; text-style: bold; }
    }
    """

    def __init__(self, pin: TeacherPin):
        super().__init__()
        self.pin = pin

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Translated(lambda texts: texts.pin_title, classes="title")
            if self.pin.is_set:
                yield Translated(lambda texts: texts.pin_prompt)
                yield Input(password=True, id="pin")
            else:
                yield Translated(lambda texts: texts.pin_not_set)
            yield Translated(classes="feedback")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.input.clear()
        if self.pin.check(event.value):
            self.dismiss(True)
        elif seconds := self.pin.locked_seconds():
            self.query_one(".feedback", Translated).show(lambda texts: texts.pin_locked.format(seconds=seconds))
        else:
            self.query_one(".feedback", Translated).show(lambda texts: texts.pin_wrong)
