"""The question box, with Up/Down to bring back this conversation's earlier questions."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.widgets import Input

from parrot_edge.kiosk.i18n import TEXTS, Language


class QuestionInput(Input):
    """Outside kiosk mode its frame also shows how to quit (the key line has no room left)."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up", "recall(-1)", show=False),
        Binding("down", "recall(1)", show=False),
    ]

    def __init__(self, *, show_quit_key: bool):
        super().__init__(id="question", select_on_focus=False)
        self._show_quit_key = show_quit_key
        self.history: list[str] = []
        self._position = 0  # len(history) means "the text being typed now"
        self._draft = ""

    def on_mount(self) -> None:
        self.watch(self.app, "language", self._translate)

    def _translate(self, language: Language) -> None:
        self.placeholder = TEXTS[language].placeholder
        self.border_subtitle = TEXTS[language].quit_hint if self._show_quit_key else None

    def remember(self, question: str) -> None:
        if not self.history or self.history[-1] != question:
            self.history.append(question)
        self._position = len(self.history)

    def action_recall(self, step: int) -> None:
        position = min(max(self._position + step, 0), len(self.history))
        if position == self._position:
            return
        if self._position == len(self.history):
            self._draft = self.value
        self._position = position
        self.value = self.history[position] if position < len(self.history) else self._draft
        self.cursor_position = len(self.value)
