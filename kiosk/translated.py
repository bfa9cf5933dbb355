"""A line of interface text that follows the app's language, switched at run time."""

from __future__ import annotations

from collections.abc import Callable

from textual.widgets import Static

from parrot_edge.kiosk.i18n import TEXTS, Language, Texts

TextChoice = Callable[[Texts], str]


class Translated(Static):
    """Static text chosen from `Texts`; re-rendered whenever `app.language` changes. Never Rich markup, so
    nothing on screen can be turned into an action link."""

    def __init__(self, choose: TextChoice | None = None, *, id: str | None = None, classes: str | None = None):
        super().__init__(markup=False, id=id, classes=classes)
        self._choose = choose

    def on_mount(self) -> None:
        self.watch(self.app, "language", self._render_language)

    def show(self, choose: TextChoice | None) -> None:
        """Show other text (None: nothing); it follows the language from now on."""
        self._choose = choose
        self._render_language(self.app.language)

    def _render_language(self, language: Language) -> None:
        self.update(self._choose(TEXTS[language]) if self._choose else "")
        self.display = self._choose is not None
