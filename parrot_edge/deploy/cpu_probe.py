"""Can this CPU run our build of llama.cpp? Asked in a child process, so a wrong answer is not a crash.

llama.cpp is compiled for the CPU it was built on unless told otherwise. On an older school machine
(no AVX2, say) its first matrix multiplication is an illegal instruction, and the process dies with
SIGILL and no explanation. So before llama.cpp is loaded in-process, a child process loads it, builds a
tiny random llama model with a few quantised tensors (so the real Q4_0, Q8_0, F16 and F32 kernels run),
and evaluates a short prompt and one more token. If the child dies of a signal, the parent explains
what the CPU has and how to rebuild llama-cpp-python for it.

Run as `python -m parrot_edge.deploy.cpu_probe MODEL.gguf`, this module is that child.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# What llama.cpp's CPU kernels use, as /proc/cpuinfo names them, with the ggml CMake switch for each one
# that a default (GGML_NATIVE=OFF) build turns on; see ggml/CMakeLists.txt.
X86_FEATURES = {"SSE4.2": ("sse4_2", "SSE42"), "AVX": ("avx", "AVX"), "AVX2": ("avx2", "AVX2"),
                "FMA": ("fma", "FMA"), "F16C": ("f16c", "F16C"), "BMI2": ("bmi2", "BMI2"),
                "AVX-512": ("avx512f", None)}
ARM_FEATURES = {"NEON/ASIMD": ("asimd", None), "dotprod": ("asimddp", None), "FP16": ("asimdhp", None),
                "i8mm": ("i8mm", None), "SVE": ("sve", None)}


@dataclass(frozen=True)
class CpuInfo:
    model: str
    arch: str
    logical_cores: int
    features: dict[str, bool]  # label → present, in the order above

    def feature_summary(self) -> str:
        return ", ".join(f"{label} {'yes' if present else 'NO'}" for label, present in self.features.items())


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    message: str  # what ran, or what went wrong and what to do about it
    system_info: str = ""  # llama_print_system_info() of this build, when it could be asked


def cpu_info(cpuinfo: Path = Path("/proc/cpuinfo"), arch: str = platform.machine()) -> CpuInfo:
    """Model name and the instruction-set features llama.cpp cares about, from /proc/cpuinfo."""
    fields: dict[str, str] = {}
    try:
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip().lower(), value.strip())  # the first processor's entry
    except OSError:
        pass  # not Linux, or /proc hidden: report what platform knows
    flags = set((fields.get("flags") or fields.get("features") or "").split())
    model = fields.get("model name") or fields.get("model") or fields.get("hardware") or platform.processor() or arch
    table = ARM_FEATURES if _is_arm(arch) else X86_FEATURES
    return CpuInfo(model, arch, os.cpu_count() or 1, {label: flag in flags for label, (flag, _) in table.items()})


def _is_arm(arch: str) -> bool:
    return arch in ("aarch64", "arm64") or arch.startswith("arm")


def rebuild_advice(cpu: CpuInfo) -> str:
    """The pip command that rebuilds llama-cpp-python for this CPU rather than the build machine's."""
    if _is_arm(cpu.arch):
        cmake = ["-DGGML_NATIVE=OFF",
                 f"-DGGML_CPU_ARM_ARCH={'armv8.2-a+dotprod' if cpu.features['dotprod'] else 'armv8-a'}"]
    else:  # GGML_NATIVE=OFF alone still turns on AVX, AVX2, FMA, F16C, BMI2 and SSE4.2: switch off the missing
        cmake = ["-DGGML_NATIVE=OFF"] + [f"-DGGML_{switch}=OFF" for label, (_, switch) in X86_FEATURES.items()
                                         if switch and not cpu.features[label]]
    try:
        requirement = f"llama-cpp-python=={version('llama-cpp-python')}"
    except PackageNotFoundError:
        requirement = "llama-cpp-python"
    return (f'CMAKE_ARGS="{" ".join(cmake)}" pip install --force-reinstall --no-cache-dir '
            f"--no-binary llama-cpp-python {requirement}")


def write_probe_model(path: Path) -> None:
    """A tiny random llama-architecture GGUF: 2 layers, 64 wide, a 259-token byte vocabulary. (Long because a
    GGUF's metadata is a list of keys llama.cpp requires; they read best together.)"""
    import gguf
    import numpy as np

    n_embd, n_ff, n_head, n_head_kv, n_layer = 64, 128, 4, 2, 2
    q4_0, q8_0, f16, f32 = (gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0,
                            gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)]
    token_types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    token_types += [gguf.TokenType.BYTE] * 256
    rng = np.random.default_rng(0)

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(n_layer)
    writer.add_context_length(256)
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(n_ff)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(n_embd // n_head)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)

    def tensor(name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> None:
        weights = rng.standard_normal(shape, dtype=np.float32) * 0.05
        if qtype == f32:
            writer.add_tensor(name, weights)
        elif qtype == f16:
            writer.add_tensor(name, weights.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(weights, qtype), raw_dtype=qtype)

    kv_width = n_head_kv * n_embd // n_head
    tensor("token_embd.weight", (len(tokens), n_embd), q8_0)
    tensor("output_norm.weight", (n_embd,), f32)
    tensor("output.weight", (len(tokens), n_embd), q8_0)
    for layer in range(n_layer):
        for name, shape, qtype in [("attn_norm", (n_embd,), f32), ("attn_q", (n_embd, n_embd), q4_0),
                                   ("attn_k", (kv_width, n_embd), q4_0), ("attn_v", (kv_width, n_embd), f16),
                                   ("attn_output", (n_embd, n_embd), q8_0), ("ffn_norm", (n_embd,), f32),
                                   ("ffn_gate", (n_ff, n_embd), q4_0), ("ffn_up", (n_ff, n_embd), f16),
                                   ("ffn_down", (n_embd, n_ff), q8_0)]:
            tensor(f"blk.{layer}.{name}.weight", shape, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def probe_llama_cpp(child_command: list[str] | None = None, timeout: float = 120) -> ProbeResult:
    """Evaluate a tiny model with llama.cpp in a child process; never crashes the caller.

    `child_command` replaces `python -m parrot_edge.deploy.cpu_probe` (the model path is appended); tests use it
    to stand in a child that dies of SIGILL.
    """
    with tempfile.TemporaryDirectory(prefix="parrot-edge-probe-") as directory:
        model = Path(directory) / "probe.gguf"
        write_probe_model(model)
        command = [*(child_command or [sys.executable, "-m", "parrot_edge.deploy.cpu_probe"]), str(model)]
        started = time.monotonic()
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return ProbeResult(False, f"llama.cpp did not finish evaluating a tiny test model in {timeout:.0f} s")
    seconds = time.monotonic() - started
    if child.returncode < 0:
        return ProbeResult(False, _crash_message(signal.Signals(-child.returncode), cpu_info()))
    if "No module named 'llama_cpp'" in child.stderr:
        return ProbeResult(False, "llama-cpp-python is not installed: pip install 'parrot-edge[server]'")
    if child.returncode != 0:
        last_lines = " | ".join(child.stderr.strip().splitlines()[-3:]) or f"exit status {child.returncode}"
        return ProbeResult(False, f"llama.cpp could not evaluate a tiny test model: {last_lines}")
    report = json.loads(child.stdout.strip().splitlines()[-1])
    return ProbeResult(True, f"llama.cpp evaluated a tiny test model in a child process ({seconds:.1f} s)",
                       report["system_info"].strip())


def _crash_message(sig: signal.Signals, cpu: CpuInfo) -> str:
    if sig == signal.SIGILL:
        what = "this build of llama.cpp uses CPU instructions this processor lacks"
    else:
        what = f"llama.cpp crashed ({sig.name}) evaluating a tiny test model, so it cannot serve models here"
    return (f"{what} (CPU: {cpu.model}, {cpu.arch}; {cpu.feature_summary()}). "
            f"Rebuild it for this CPU with: {rebuild_advice(cpu)}")


def _evaluate(model_path: Path) -> dict[str, str]:
    """The child's work: load the model, evaluate a 5-token prompt (matrix-matrix kernels), then one token."""
    from parrot_edge import llamacpp

    llama = llamacpp.lib()
    system_info = llama.llama_print_system_info().decode(errors="replace")
    model = llamacpp.load_model(model_path)
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = 64, 8, 8
    context = llama.llama_init_from_model(model, params)
    if not context:
        raise SystemExit(f"llama.cpp could not create a context: {llamacpp.recent_log()}")
    for tokens in ([1, 72, 105, 33, 10], [66]):
        array = (llama.llama_token * len(tokens))(*tokens)
        if llama.llama_decode(context, llama.llama_batch_get_one(array, len(tokens))) != 0:
            raise SystemExit(f"llama_decode failed: {llamacpp.recent_log()}")
    llama.llama_free(context)
    llama.llama_model_free(model)
    return {"system_info": system_info}


if __name__ == "__main__":
    print(json.dumps(_evaluate(Path(sys.argv[1]))))
