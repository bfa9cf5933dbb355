"""The chat as a real process: what it imports, and the real `parrot-edge chat --kiosk` in a pseudo-terminal
that says it is the Linux console, read back off an 80x24 terminal emulator (pyte)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pexpect
import pyte
import pytest
from serving import run_server

INFERENCE_STACK = {"llama_cpp", "torch", "fastapi", "numpy", "uvicorn"}
ROWS, COLUMNS = 24, 80

# `python -m parrot_edge ...` that writes the modules it imported to argv[1] on the way out.
RUN_RECORDING_MODULES = """
import atexit, json, runpy, sys
modules_file = sys.argv[1]
atexit.register(lambda: open(modules_file, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["parrot-edge", *sys.argv[2:]]
runpy.run_module("parrot_edge", run_name="__main__")
"""

# The first Up arrow raises, as a bug would, to prove what kiosk mode does with a crash.
CRASH_ON_FIRST_UP = """
from parrot_edge.kiosk.question_input import QuestionInput
recall = QuestionInput.action_recall
def crash_once(self, step):
    QuestionInput.action_recall = recall
    raise RuntimeError("an injected bug")
QuestionInput.action_recall = crash_once
""" + RUN_RECORDING_MODULES


@pytest.fixture(scope="module")
def chat_model(default_gguf):
    """The model the end-to-end test talks to."""
    return default_gguf


def top_level(modules: list[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def test_importing_the_kiosk_loads_no_inference_stack():
    code = "import json, sys, parrot_edge.kiosk.app; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = top_level(json.loads(result.stdout))
    assert "textual" in loaded and "httpx" in loaded
    assert not loaded & INFERENCE_STACK


class Screen:
    """The child's terminal: everything it writes goes through pyte, a real VT100/xterm emulator, at 80x24.

    The screen is the child's pexpect log of what it read, so output that `expect` consumed is on it too, and
    `received` keeps all of it, escapes included, for what the screen does not show (leaving the alternate
    screen, a traceback printed after the chat is gone). pyte knows no kitty keyboard protocol: the `ESC [ < u`
    Textual sends on its way out leaves a stray "u", after the last screen any test reads."""

    def __init__(self, child: pexpect.spawn):
        self.child = child
        self.received = ""
        self._terminal = pyte.Screen(COLUMNS, ROWS)
        self._stream = pyte.Stream(self._terminal)
        child.logfile_read = self  # pexpect hands every decoded piece it reads to write()

    def write(self, text: str) -> None:
        self.received += text
        self._stream.feed(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[str]:
        with_more = True
        while with_more:
            try:
                self.child.read_nonblocking(1 << 16, timeout=0.05)
            except (pexpect.TIMEOUT, pexpect.EOF):
                with_more = False
        return [line.rstrip() for line in self._terminal.display]

    def text(self) -> str:
        return "\n".join(self.lines())

    def wait_for(self, condition: Callable[[list[str]], bool], what: str, timeout: float = 120) -> list[str]:
        """Poll the screen until `condition(lines)`; the timeout is only how long a broken chat gets to show it."""
        deadline = time.monotonic() + timeout
        while not condition(lines := self.lines()):
            if time.monotonic() > deadline:
                shown = "\n".join(lines)
                raise AssertionError(f"timed out waiting for {what}; the screen shows:\n{shown}")
            time.sleep(0.02)
        return lines


def spawn_chat(script: str, modules_file: Path, url: str, data_dir: Path) -> pexpect.spawn:
    env = {**os.environ, "TERM": "linux", "LANG": "C.UTF-8", "PARROT_EDGE_DATA_DIR": str(data_dir),
           "PARROT_EDGE_TEACHER_PIN": "2468",
           "TEXTUAL_ALLOW_SIGNALS": "1"}  # would make Ctrl+C and Ctrl+Z signals, were kiosk mode not to clear it
    return pexpect.spawn(sys.executable, ["-c", script, str(modules_file), "chat", "--url", url, "--lang", "en",
                                          "--kiosk"],
                         env=env, dimensions=(ROWS, COLUMNS), encoding="utf-8", codec_errors="replace")


def stop_like_the_service_manager(child: pexpect.spawn) -> None:
    child.kill(signal.SIGTERM)
    child.expect(pexpect.EOF, timeout=20)  # what it reads meanwhile goes to the Screen too (its logfile_read)
    child.wait()


def answer_rows(lines: list[str]) -> list[str]:
    """The rows between the assistant's label (or the top, once it has scrolled away) and the question box."""
    start = next((i for i, line in enumerate(lines) if line.strip() == "Assistant:"), -1)
    end = next(i for i, line in enumerate(lines) if i > start and line.startswith("+--"))
    return [line.strip() for line in lines[start + 1:end] if line.strip()]


@pytest.mark.slow
def test_the_real_chat_in_a_linux_console(chat_model, tmp_path):
    modules_file = tmp_path / "modules.json"
    question = "What is the capital of France?"
    with run_server(tmp_path, "--model", str(chat_model), "--slots", "1",
                    env={"PARROT_EDGE_DEFAULT_MAX_TOKENS": "96"}) as server:  # an answer that fits on screen
        child = spawn_chat(RUN_RECORDING_MODULES, modules_file, server.url, tmp_path / "kiosk")
        try:
            screen = Screen(child)
            screen.wait_for(lambda lines: "Hello! I am the classroom assistant." in "\n".join(lines) and
                            " | ready" in lines[-2], "the welcome screen and a ready server")
            child.send(question)
            screen.wait_for(lambda lines: question in lines[-4], "the typed question in the box")
            child.send("\r")
            asked_at = time.monotonic()
            screen.wait_for(lambda lines: "Assistant:" in "\n".join(lines) and
                            answer_rows(lines) not in ([], ["Thinking..."]), "the first words")
            first_words_after = time.monotonic() - asked_at
            lines = screen.wait_for(lambda lines: "tok/s" in lines[-2], "the whole answer", 300)
            answer = " ".join(answer_rows(lines))

            for key in "cz\\q":  # interrupt, suspend, quit (and its core dump): all plain keys in kiosk mode
                child.sendcontrol(key)
            child.send("still here")
            screen.wait_for(lambda lines: "still here" in lines[-4], "the chat to go on taking keys")
            assert child.isalive()
            child.send("\x1b[[B")  # F2 as the Linux console sends it
            screen.wait_for(lambda lines: lines[-1].strip().startswith("Enter enviar"), "the Spanish interface")
            stop_like_the_service_manager(child)
        finally:
            child.close(force=True)

    print(f"first words on screen {first_words_after:.2f} s after Enter; answer: {answer!r}")
    assert len(re.findall(r"\w+", answer)) >= 3, lines
    assert "You:" in [line.strip() for line in lines] and question in "\n".join(lines)
    answer_text = set(answer_rows(lines))  # the model's words may hold any character; the chrome may not
    assert all(ord(char) < 0x100 for row in lines if row.strip() not in answer_text for char in row), lines
    assert child.exitstatus == 0
    assert "\x1b[?1049l" in screen.received[-300:]  # the console is given back as it was
    assert "Traceback" not in screen.received
    assert not top_level(json.loads(modules_file.read_text())) & INFERENCE_STACK
    assert question not in "".join(p.read_text(errors="replace") for p in (tmp_path / "kiosk").rglob("*.log"))


def test_a_crash_in_kiosk_mode_starts_a_fresh_chat_and_shows_no_traceback(tmp_path):
    child = spawn_chat(CRASH_ON_FIRST_UP, tmp_path / "modules.json", "http://127.0.0.1:9", tmp_path / "kiosk")
    try:
        screen = Screen(child)
        screen.wait_for(lambda lines: "Hello! I am the classroom assistant." in "\n".join(lines), "the welcome")
        child.send("my secret question")
        screen.wait_for(lambda lines: "my secret question" in lines[-4], "the typed question")
        child.send("\x1b[A")
        lines = screen.wait_for(lambda lines: "Sorry, something went wrong. Let's start again." in "\n".join(lines),
                                "the fresh chat")
        assert child.isalive() and "my secret question" not in "\n".join(lines)
        stop_like_the_service_manager(child)
    finally:
        child.close(force=True)

    assert child.exitstatus == 0
    assert "Traceback" not in screen.received and "injected" not in screen.received
    log = (tmp_path / "kiosk" / "chat.log").read_text()
    assert "starting it again" in log and "my secret question" not in log
