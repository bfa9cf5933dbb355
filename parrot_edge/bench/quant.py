"""`parrot-edge bench quant`: what calibration buys at 4 bits, against llama.cpp's own imatrix pipeline.

One checkpoint (default: SmolLM2-135M's real weights rebuilt as an HF checkpoint, as `bench convert` does),
made into F16, plain Q4_K_M and IQ4_XS (`--no-calibrate`), parrot-edge's calibrated Q4_K_M and IQ4_XS (the
built-in text, or --calibrate FILE), and llama.cpp's own pipeline on the same text: convert_hf_to_gguf.py to
F16, `llama-imatrix` on the text, `llama-quantize --imatrix` to Q4_K_M (the two tools built once from the
vendored llama.cpp, cached: parrot_edge.bench.llama_tools). Each pipeline's steps run as their own processes,
measured (wall time, peak RSS) in interleaved rounds; then llama.cpp computes every file's perplexity on a
held-out text that no pipeline calibrated on: CPython's own `pydoc_data` topics (every Python has them;
English prose about the language), its first --tokens tokens in 512-token windows.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from parrot_edge.bench.conversion import Step, default_source, perplexity, run_measured
from parrot_edge.bench.llama_tools import convert_hf_script, llama_tool
from parrot_edge.files import cache_dir


@dataclass(frozen=True)
class Pipeline:
    label: str
    output: str  # file name in the work folder
    calibrated: bool  # on the calibration text (the goals compare these with the plain files)


PIPELINES = (
    Pipeline("F16", "f16.gguf", False),
    Pipeline("Q4_K_M plain", "q4_k_m-plain.gguf", False),
    Pipeline("Q4_K_M calibrated", "q4_k_m-calibrated.gguf", True),
    Pipeline("IQ4_XS plain", "iq4_xs-plain.gguf", False),
    Pipeline("IQ4_XS calibrated", "iq4_xs-calibrated.gguf", True),
    Pipeline("llama.cpp imatrix Q4_K_M", "q4_k_m-llama-imatrix.gguf", True),
)


def held_out_text() -> str:
    """CPython's pydoc topics, in a fixed order: held out from every calibration."""
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def calibration_file(work: Path, calibrate: Path | None) -> tuple[Path, str]:
    """The calibration text as a plain file for llama-imatrix (the built-in one without its header), and its
    name as the manifest records it."""
    from parrot_edge.converters.calibration import read_calibration

    calibration = read_calibration(calibrate)
    path = work / "calibration.txt"
    path.write_text(calibration.text, encoding="utf-8")
    return path, calibration.name


def steps_of(pipeline: Pipeline, source: Path, work: Path, text: Path, calibrate: Path | None) -> list[list[str]]:
    """The commands a pipeline runs, in order."""
    ours = [sys.executable, "-m", "parrot_edge", "convert", str(source), "-o", str(work / pipeline.output)]
    if pipeline.label.startswith("llama.cpp"):
        f16, imatrix = work / "llama-cpp-f16.gguf", work / "imatrix.gguf"
        return [[sys.executable, str(convert_hf_script()), str(source), "--outfile", str(f16), "--outtype", "f16"],
                [str(llama_tool("llama-imatrix")), "-m", str(f16), "-f", str(text), "-o", str(imatrix), "-c", "512",
                 "--no-ppl", "-t", str(os.cpu_count() or 2)],
                [str(llama_tool("llama-quantize")), "--imatrix", str(imatrix), str(f16), str(work / pipeline.output),
                 "Q4_K_M"]]
    quant = pipeline.label.split()[0].lower()
    if not pipeline.calibrated:
        return [ours + ["--quant", quant] + (["--no-calibrate"] if quant != "f16" else [])]
    return [ours + ["--quant", quant] + (["--calibrate", str(calibrate)] if calibrate else [])]


def run_pipeline(pipeline: Pipeline, source: Path, work: Path, text: Path, calibrate: Path | None) -> list[Step]:
    script = convert_hf_script()
    incumbent_env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    steps = [run_measured(argv, cwd=work, env=incumbent_env if argv[1:2] == [str(script)] else None)
             for argv in steps_of(pipeline, source, work, text, calibrate)]
    (work / "llama-cpp-f16.gguf").unlink(missing_ok=True)
    return steps


def bench_quant_command(args) -> int:
    from parrot_edge.converters.gguf_eval import gguf_tokenize

    cache = cache_dir("bench")
    cache.mkdir(parents=True, exist_ok=True)
    source = args.source.resolve() if args.source else default_source(cache, args.gguf)
    work = cache / "quant"
    work.mkdir(exist_ok=True)
    text, calibration_name = calibration_file(work, args.calibrate)
    llama_tool("llama-imatrix"), llama_tool("llama-quantize")  # built (once) before anything is timed
    load = os.getloadavg()[0]
    print(f"source {source}; calibration {calibration_name}; {os.cpu_count()} CPUs, 1-minute load {load:.2f} at "
          f"the start; {args.rounds} rounds, interleaved")

    timings: dict[str, list[list[Step]]] = {p.label: [] for p in PIPELINES}
    for round_number in range(1, args.rounds + 1):
        for pipeline in PIPELINES:
            steps = run_pipeline(pipeline, source, work, text, args.calibrate)
            timings[pipeline.label].append(steps)
            print(f"  round {round_number}: {pipeline.label}: "
                  + " + ".join(f"{s.seconds:.1f} s / {s.peak_rss_mb:.0f} MB" for s in steps), file=sys.stderr)

    held_out = held_out_text()
    tokens = gguf_tokenize(work / PIPELINES[0].output, [held_out])[0][: args.tokens]
    figures = {p.label: perplexity(work / p.output, tokens, args.threads) for p in PIPELINES}
    print_table(work, timings, figures)
    print(f"(median wall time over the rounds, each step its own process; peak RSS the highest step's; perplexity "
          f"by llama.cpp on the first {len(tokens)} tokens of Python {platform.python_version()}'s pydoc_data topics "
          f"(sha256 {hashlib.sha256(held_out.encode()).hexdigest()[:12]}…) in 512-token windows)")
    print_goals(timings, figures)
    return 0


def _seconds(runs: list[list[Step]]) -> float:
    return statistics.median(sum(step.seconds for step in steps) for steps in runs)


def print_table(work: Path, timings: dict[str, list[list[Step]]], figures: dict[str, float]) -> None:
    f16, plain = figures["F16"], figures["Q4_K_M plain"]
    print(f"\n{'':26} {'wall time':>10} {'peak RSS':>9} {'size':>9} {'perplexity':>11} {'Q4_K_M gap closed':>18}")
    for pipeline in PIPELINES:
        runs = timings[pipeline.label]
        closed = (f"{(plain - figures[pipeline.label]) / (plain - f16):>17.0%}"
                  if pipeline.label.startswith(("Q4_K_M", "llama.cpp")) and plain != f16 else "")
        print(f"{pipeline.label:<26} {_seconds(runs):>8.1f} s "
              f"{max(step.peak_rss_mb for steps in runs for step in steps):>6.0f} MB "
              f"{(work / pipeline.output).stat().st_size / 1e6:>6.1f} MB {figures[pipeline.label]:>11.4f} {closed}")


def print_goals(timings: dict[str, list[list[Step]]], figures: dict[str, float]) -> None:
    f16, plain, ours = figures["F16"], figures["Q4_K_M plain"], figures["Q4_K_M calibrated"]
    theirs = figures["llama.cpp imatrix Q4_K_M"]
    closed = (plain - ours) / (plain - f16) if plain != f16 else float("nan")
    ratio = _seconds(timings["Q4_K_M calibrated"]) / _seconds(timings["Q4_K_M plain"])
    print("goals:")
    print(f"  calibrated Q4_K_M closes {closed:.0%} of plain Q4_K_M's gap to F16 (goal ≥ 50%): "
          f"{'met' if closed >= 0.5 else 'NOT met'}")
    print(f"  calibrated Q4_K_M {ours:.4f} vs llama.cpp's imatrix pipeline {theirs:.4f} (goal: no worse): "
          f"{'met' if ours <= theirs else 'NOT met'}")
    print(f"  conversion with calibration takes {ratio:.2f}× the time without (goal ≤ 2×): "
          f"{'met' if ratio <= 2 else 'NOT met'}")
