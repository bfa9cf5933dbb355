"""The converter's commands: `parrot-edge convert`, `verify` and `inspect` (arguments: parrot_edge/cli.py).

Figures go to stdout, progress and notes to stderr. Exit codes: 0 done, 1 environment (unwritable output,
llama.cpp failure), 2 bad input, 3 verification failed, 130 interrupted. torch is imported by the
commands that need it, not by `inspect`.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

from parrot_edge.errors import VerificationFailed
from parrot_edge.store.manifest import manifest_path_for


def convert_command(args) -> int:
    from parrot_edge.converters.convert import check_output, check_quant, convert, open_source, say
    from parrot_edge.converters.verify import read_texts, verify

    quant = check_quant(args.quant)
    check_output(args.output)
    texts = read_texts(args.text)  # a bad --text or --calibrate fails now, not after converting
    calibration = _calibration(args, quant)
    checkpoint, vocabulary = open_source(args.source, args.family, args.model_config, args.tokenizer)
    with _terminate_means_interrupt():
        manifest = convert(checkpoint, vocabulary, args.output, quant, name=args.name, license=args.license,
                           threads=args.threads, strict=args.strict, calibration=calibration)
    calibrated = f", calibrated on {manifest.calibration.text}" if manifest.calibration else ""
    print(f"wrote {args.output} ({manifest.size / 1e6:.1f} MB, {quant.upper()}{calibrated}, "
          f"{manifest.parameters / 1e6:.1f} M parameters, tokenizer {manifest.tokenizer}) "
          f"and {manifest_path_for(args.output).name}")
    if not args.verify and not checkpoint.approximations:
        return 0
    # an approximate conversion is always measured: its manifest must say how far it is from the checkpoint
    say("verifying: PyTorch reference forward vs llama.cpp" + ("" if args.verify else
                                                               " (always, for an approximate conversion)"))
    report = verify(checkpoint, vocabulary, args.output, texts, args.threads)
    print("\n".join(report.lines()))
    manifest.verification = report.figures
    manifest.write(manifest_path_for(args.output))
    if not report.figures.passed:
        raise VerificationFailed(f"{args.output} failed verification (it is kept, and its manifest records why)")
    return 0


def _calibration(args, quant: str):
    """The text to calibrate on: --calibrate FILE, else the built-in one for the 4-bit types; none with
    --no-calibrate, or for types that no importance matrix changes (said, when --calibrate asked for it)."""
    from parrot_edge.converters.calibration import built_in, read_calibration
    from parrot_edge.converters.convert import say
    from parrot_edge.converters.quants import CALIBRATED_BY_DEFAULT, DIRECT_QUANTS, NOT_CALIBRATED

    if args.no_calibrate:
        return None
    if args.calibrate is not None:
        calibration = read_calibration(args.calibrate)
        if quant in DIRECT_QUANTS or quant in NOT_CALIBRATED:
            say(f"note: --calibrate has no effect on {quant.upper()}: "
                + ("it is written exactly" if quant in DIRECT_QUANTS else "its quantiser takes no importance matrix"))
            return None
        return calibration
    return built_in() if quant in CALIBRATED_BY_DEFAULT else None


def verify_command(args) -> int:
    from parrot_edge.converters.convert import open_source
    from parrot_edge.converters.verify import read_texts, verify

    checkpoint, vocabulary = open_source(args.source, args.family, args.model_config, args.tokenizer)
    report = verify(checkpoint, vocabulary, args.gguf, read_texts(args.text), args.threads)
    print("\n".join(report.lines()))
    if not report.figures.passed:
        raise VerificationFailed(f"{args.gguf} does not match {args.source}")
    return 0


def inspect_command(args) -> int:
    from parrot_edge.converters.inspect_gguf import describe

    print(describe(args.gguf, all_tensors=args.tensors))
    return 0


@contextlib.contextmanager
def _terminate_means_interrupt() -> Iterator[None]:
    """SIGTERM (systemd, `kill`) unwinds like Ctrl-C, so temp files are removed on the way out."""
    def interrupt(_signum, _frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
