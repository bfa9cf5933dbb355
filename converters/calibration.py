"""The calibration text: the built-in bilingual school text or a maintainer's file, and its token windows.

A 4-bit conversion is calibrated on text (converters/importance.py measures which input columns of every
matrix carry the most signal on it). The built-in text, calibration/school-en-es.txt beside this module, was
written for parrot-edge in English and Spanish on the subjects of a school day (its header says so); `--calibrate
FILE` takes any UTF-8 text instead. The manifest records which text it was, by name and sha256, so a file can be
traced to the exact text that shaped it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from parrot_edge.converters.errors import BadInput

BUILT_IN = Path(__file__).with_name("calibration") / "school-en-es.txt"
BUILT_IN_NAME = "built-in:school-en-es"
WINDOW = 512  # tokens per window, as llama-imatrix's default context
# Tokens calibrated on: the gain is flat past a few thousand (SmolLM2-135M Q4_K_M, held-out perplexity with F16 at
# 14.49 and uncalibrated 15.58: 15.017 on 2048 tokens, 15.016 on 4096, 15.036 on 8192; measured 2026-12-02),
# while the cost grows with every token
MAX_TOKENS = 4096
HEADER_END = "\n=====\n"  # the built-in file's header (origin, licence) ends here; it is not calibrated on


@dataclass(frozen=True)
class CalibrationText:
    name: str  # "built-in:school-en-es" or the file's name
    sha256: str  # of the file's bytes, as `sha256sum` prints it
    text: str


def built_in() -> CalibrationText:
    data = BUILT_IN.read_bytes()
    text = data.decode("utf-8")
    return CalibrationText(BUILT_IN_NAME, hashlib.sha256(data).hexdigest(), text.split(HEADER_END, 1)[-1])


def read_calibration(path: Path | None) -> CalibrationText:
    """The built-in text (None) or a UTF-8 file, refused plainly if it cannot be read or holds no text."""
    if path is None:
        return built_in()
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
    except OSError as exc:
        raise BadInput(f"cannot read the calibration text {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise BadInput(f"the calibration text {path} is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if not text.strip():
        raise BadInput(f"the calibration text {path} is empty: give a file of ordinary text (a few thousand words "
                       "of what the model will read), or leave --calibrate out to use the built-in one")
    return CalibrationText(path.name, hashlib.sha256(data).hexdigest(), text)


def token_windows(encode, text: str, context_length: int, max_tokens: int = MAX_TOKENS) -> list[list[int]]:
    """The text as windows of equal length (WINDOW, or the model's context if shorter), at most `max_tokens` in
    all, spread evenly over the whole text (so every subject and both languages of the built-in text are read).
    Each paragraph is tokenised as the model reads a text (BOS/EOS as its tokenizer adds them), the paragraphs
    are packed one after another and cut into windows; a text shorter than one window is used whole."""
    width = min(WINDOW, context_length)
    stream = [token for paragraph in text.split("\n\n") if paragraph.strip() for token in encode(paragraph.strip())]
    if len(stream) < 2:
        raise BadInput("the calibration text is too short: it gives fewer than 2 tokens")
    if len(stream) < width:
        return [stream[:max_tokens]]
    windows = [stream[start:start + width] for start in range(0, len(stream) - width + 1, width)]
    wanted = max(1, min(len(windows), max_tokens // width))
    return [windows[k * len(windows) // wanted] for k in range(wanted)]
