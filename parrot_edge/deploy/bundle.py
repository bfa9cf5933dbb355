"""`parrot-edge bundle`: a folder, copied to a USB stick, that installs parrot-edge on a school computer
with no network at all.

What goes in OUT:
    install.sh, uninstall.sh   run as root on the school computer (from packaging/)
    config.toml, systemd/      the settings template and the units (from packaging/)
    README.txt                 for the teacher: installing, what they will see, updating, LAN mode
    bundle-info.txt            version, platform, Python versions and models, read by install.sh
    wheels/                    parrot-edge, every runtime dependency of its server and kiosk for each Python
                               version asked for, a portable llama-cpp-python, and pip itself
    models/<name>/             each model's GGUF with its manifest beside it (<file>.json), the way
                               `parrot-edge models add` checks them
    SHA256SUMS                 of everything above; install.sh refuses a stick that does not match it

The stick is assembled in a temporary folder beside OUT and renamed into place only once it is complete.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.files import cache_dir, folder_replaced_atomically

if TYPE_CHECKING:  # imported where used: they pull in pydantic, which `import parrot_edge.deploy.bundle` should not
    from parrot_edge.store.manifest import ModelManifest
    from parrot_edge.store.model_store import ModelStore

PLATFORMS = ("x86_64", "aarch64")
DEFAULT_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
EXTRAS = "server,kiosk"
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]

# llama-cpp-python, built to run on every CPU of the target architecture. PyPI has only its source, and
# pip's default build compiles for the build machine's own CPU (-march=native): on an older school
# computer that wheel dies of "illegal instruction". Instead ggml's CPU backend is compiled once per
# processor generation, each a loadable module (x64, sse42, sandybridge, haswell, skylakex, alderlake, …;
# armv8.0 to armv9.2 on aarch64), and at start-up llama.cpp loads the best one this CPU can run. (It looks
# for them beside the running executable; llama-cpp-python puts them in site-packages/bin/, so install.sh
# links them beside the venv's python.)
PORTABLE_LLAMA_CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
    "-DLLAVA_BUILD=OFF",  # no image models here: skips libmtmd
)
# OpenMP stays on (without it ggml starts new threads for every llama_decode: 3 to 100 times slower on two
# cores), and its runtime travels in the wheel, added by this CMake snippet in packaging/.
OPENMP_RUNTIME_CMAKE = "llama-openmp-runtime.cmake"
# The same care for the other binary wheels: NumPy 2.4 and later need an x86-64-v2 processor (SSE4.2, POPCNT)
# and die of "illegal instruction" on the Core 2, Athlon II / Phenom II and early Atom computers schools are
# often given; NumPy 2.3 runs on any x86-64.
PORTABLE_PINS = {"x86_64": ["numpy<2.4"], "aarch64": []}
_NINJA_STEP = re.compile(r"^\s*\[(\d+)/(\d+)\]")
# Left out of the copy of the checkout a wheel is built from: setuptools would reuse a stale build/.
_NOT_SOURCE = (".git", ".venv", ".cache", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "*.gguf")


def bundle_command(args) -> int:
    from parrot_edge.settings import load_settings
    from parrot_edge.store.model_store import DEFAULT_MODEL, ModelStore, catalog

    target = args.platform or host_platform()
    if target not in PLATFORMS:
        raise ParrotEdgeError(f"this computer is {target}: say which computers the stick is for with --platform")
    if args.prepare:  # only the long part, ahead of time (`make test` does this, so the tests find it built)
        wheel = portable_llama_wheel(Project.find().llama_version, target, lambda what: print(what, flush=True))
        print(f"The portable llama-cpp-python for {target} is ready: {wheel}")
        return 0
    if args.out is None:
        raise ParrotEdgeError("say where to make the stick: --out FOLDER (e.g. --out /media/usb/parrot-edge)")
    pythons = _check_pythons(args.pythons or DEFAULT_PYTHONS)
    store = ModelStore(load_settings().models_dir)
    models = list(dict.fromkeys(args.models or [DEFAULT_MODEL]))
    unknown = [name for name in models if store.get(name) is None and name not in catalog()]
    if unknown:
        raise ParrotEdgeError(f"no model {', '.join(unknown)} in {store.models_dir} or the catalog: "
                              "see parrot-edge models list")
    out = args.out.resolve()
    _check_replaceable(out)
    project = Project.find()
    with folder_replaced_atomically(out) as staging:
        assemble(staging, project, target, pythons, store, models, args.wheelhouse)
    size = sum(path.stat().st_size for path in out.rglob("*") if path.is_file())
    print(f"\nThe stick is ready: {out} ({size / 1e6:,.0f} MB). On the school computer, as root:\n"
          f"  sh {out}/install.sh\n(README.txt there says more.)")
    return 0


def assemble(staging: Path, project: Project, target: str, pythons: list[str], store: ModelStore,
             models: list[str], wheelhouse: Path | None) -> None:
    """Everything the stick holds, written into `staging`; models come from `store`, else the catalog."""
    progress = _Progress(5)
    progress.step(f"llama-cpp-python {project.llama_version} for {target}, portable across its CPUs")
    llama_wheel = portable_llama_wheel(project.llama_version, target, progress.detail)
    glibc = glibc_needed(llama_wheel)  # what the school computer needs; the other wheels are chosen to match

    progress.step(f"parrot-edge {project.version} and its dependencies for Python {', '.join(pythons)}")
    with tempfile.TemporaryDirectory(prefix="parrot-edge-wheel-") as scratch:
        own_wheel = project.build_wheel(Path(scratch))
        for python in pythons:
            progress.detail(f"Python {python}…")
            download_wheels([f"{own_wheel}[{EXTRAS}]", str(llama_wheel), "pip", *PORTABLE_PINS[target]],
                            staging / "wheels", _platform_tags(target, glibc), python)

    progress.step(f"models: {', '.join(models)}")
    manifests = [collect_model(name, store, wheelhouse, staging / "models", progress.detail) for name in models]

    progress.step("install.sh, uninstall.sh, systemd units, settings template, README.txt")
    copy_packaging(staging)
    (staging / "bundle-info.txt").write_text(
        f"version={project.version}\nplatform={target}\npythons={' '.join(pythons)}\nmodels={' '.join(models)}\n"
        f"glibc={glibc}\nbuilt={time.strftime('%Y-%m-%d')}\n")
    (staging / "README.txt").write_text(teacher_readme(project.version, target, pythons, models, glibc))

    progress.step("SHA256SUMS")
    sums = write_checksums(staging)
    for manifest in manifests:  # the stick's copy itself, not only its source, must be what the manifest says
        if sums[f"models/{manifest.name}/{manifest.file}"] != manifest.sha256:
            raise ParrotEdgeError(f"the copy of {manifest.name} on the stick does not match its manifest's sha256: "
                                  "the disk may be failing; try again")


def host_platform() -> str:
    """This computer's architecture, named as --platform names them."""
    machine = os.uname().machine
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)


class _Progress:
    def __init__(self, steps: int):
        self.steps, self.done = steps, 0

    def step(self, what: str) -> None:
        self.done += 1
        print(f"[{self.done}/{self.steps}] {what}", flush=True)

    def detail(self, what: str) -> None:
        print(f"      {what}", flush=True)


def _check_pythons(pythons) -> list[str]:
    for python in pythons:
        if not re.fullmatch(r"3\.\d+", python) or int(python.split(".")[1]) < 11:
            raise ParrotEdgeError(f"--python {python}: parrot-edge needs Python 3.11 or newer (e.g. --python 3.12)")
    return sorted(set(pythons), key=lambda version: int(version.split(".")[1]))


def _check_replaceable(out: Path) -> None:
    """OUT is replaced whole, by renaming, so it must be new, empty, or an earlier stick, and not a mount point."""
    if out.is_mount() or out.is_file() or (out.is_dir() and any(out.iterdir())
                                           and not (out / "bundle-info.txt").is_file()):
        raise ParrotEdgeError(f"{out} is not a new folder nor an earlier parrot-edge stick: choose a new folder, "
                              "e.g. --out /media/usb/parrot-edge")


class Project:
    """The parrot-edge source checkout being bundled: its own wheel is built from it."""

    def __init__(self, root: Path):
        self.root = root
        metadata = tomllib.loads((root / "pyproject.toml").read_text())["project"]
        self.version: str = metadata["version"]
        pins = [re.fullmatch(r"llama-cpp-python\s*==\s*([\w.]+)", requirement)
                for requirement in metadata["optional-dependencies"]["server"]]
        pin = next((match[1] for match in pins if match), None)
        if pin is None:
            raise ParrotEdgeError("pyproject.toml must pin llama-cpp-python exactly (==) for its build to be cached")
        self.llama_version: str = pin

    @classmethod
    def find(cls) -> Project:
        import parrot_edge

        root = Path(parrot_edge.__file__).resolve().parent.parent  # the checkout holding parrot_edge/
        if not (root / "pyproject.toml").is_file():
            raise ParrotEdgeError("parrot-edge bundle runs from a parrot-edge source checkout (installed with "
                                  "pip install -e), whose wheel it builds; this parrot-edge is installed from a wheel")
        return cls(root)

    def build_wheel(self, directory: Path) -> Path:
        source = directory / "source"
        shutil.copytree(self.root, source, ignore=shutil.ignore_patterns(*_NOT_SOURCE))
        _pip(["wheel", "--no-deps", "--wheel-dir", str(directory), str(source)], "building parrot-edge's wheel")
        return next(directory.glob("parrot_edge-*.whl"))


# -- wheels


def portable_llama_wheel(version: str, target: str, progress: Callable[[str], None]) -> Path:
    """The portable llama-cpp-python wheel for `target`, built once and then taken from the cache.

    The cache is keyed by version, platform and build recipe, because pip's own wheel cache ignores CMAKE_ARGS:
    it would hand back a -march=native build made earlier for this machine.
    """
    from parrot_edge.resources import bundled_dir

    openmp_runtime = bundled_dir("packaging") / OPENMP_RUNTIME_CMAKE
    recipe = " ".join(PORTABLE_LLAMA_CMAKE_ARGS) + openmp_runtime.read_text()
    key = f"{version}-{target}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    cache = cache_dir("llama-cpp-python")
    built = cache / key
    wheels = sorted(built.glob("llama_cpp_python-*.whl"))
    if wheels:
        progress(f"cached: {wheels[0]}")
        return wheels[0]
    host = host_platform()
    if target != host:
        raise ParrotEdgeError(
            f"llama-cpp-python has no binary wheels and must be compiled for {target}, which this {host} computer "
            f"cannot do. Run the same `parrot-edge bundle` on a {target} computer (a Raspberry Pi 4 or 5 with a "
            f"64-bit system will do, slowly), or copy that computer's {built}/ folder to the same place here.")
    cache.mkdir(parents=True, exist_ok=True)
    log = cache / f"{key}.log"
    cores = os.cpu_count() or 1
    progress(f"compiling llama.cpp's CPU backend once per CPU generation: about {max(5, 60 // cores)} minutes on "
             f"{cores} cores, this once (then cached in {built}). Log: {log}")
    with folder_replaced_atomically(built, "building") as building:
        _compile_llama(version, [*PORTABLE_LLAMA_CMAKE_ARGS, f"-DCMAKE_PROJECT_llama_cpp_INCLUDE={openmp_runtime}"],
                       building, log, progress)
    return next(built.glob("llama_cpp_python-*.whl"))


def _compile_llama(version: str, cmake_args: list[str], wheel_dir: Path, log_path: Path,
                   progress: Callable[[str], None]) -> None:
    command = [*PIP, "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-python", "--verbose",
               "--wheel-dir", str(wheel_dir), f"llama-cpp-python=={version}"]
    env = {**os.environ, "CMAKE_ARGS": shlex.join(cmake_args), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    reported = 0
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env) as pip:
        for line in pip.stdout:
            log.write(line)
            step = _NINJA_STEP.match(line)
            if step and (percent := 100 * int(step[1]) // int(step[2])) >= reported + 10:
                reported = percent - percent % 10
                progress(f"compiled {reported}%")
    if pip.returncode != 0:
        raise ParrotEdgeError(f"building llama-cpp-python failed (it needs a C/C++ compiler and CMake); the end of "
                              f"{log_path}:\n{_tail(log_path.read_text(errors='replace'))}")


def glibc_needed(wheel: Path) -> str:
    """The oldest glibc the wheel's native libraries run on: the newest glibc symbol version they use."""
    with zipfile.ZipFile(wheel) as archive:
        minors = [int(minor) for name in archive.namelist() if name.endswith(".so")
                  for minor in re.findall(rb"GLIBC_2\.(\d+)", archive.read(name))]
    return f"2.{max(minors)}"


def download_wheels(requirements: list[str], dest: Path, platforms: list[str], python: str) -> None:
    """Wheels for `requirements` and all they depend on, for CPython `python` on any of `platforms`."""
    _pip(["download", "--only-binary", ":all:", "--implementation", "cp", "--python-version", python,
          *(f"--platform={platform}" for platform in platforms), "--dest", str(dest), *requirements],
         f"collecting the wheels for Python {python}")


def _platform_tags(arch: str, glibc: str) -> list[str]:
    """The wheel platforms of an `arch` Linux with `glibc`, best first. pip does not widen manylinux_2_N to
    older glibcs by itself, so each is listed."""
    minor = int(glibc.split(".")[1])
    manylinux = [f"manylinux_2_{older}_{arch}" for older in range(minor, 4, -1)]
    legacy = [f"{alias}_{arch}" for alias in ("manylinux2014", "manylinux2010", "manylinux1")]
    return [*manylinux, *legacy, f"linux_{arch}"]


def _pip(arguments: list[str], what: str) -> None:
    done = subprocess.run([*PIP, *arguments], capture_output=True, text=True)
    if done.returncode != 0:
        raise ParrotEdgeError(f"{what} failed; pip said:\n{_tail(done.stderr or done.stdout)}")


def _tail(text: str, lines: int = 12) -> str:
    return "\n".join("  " + line for line in text.strip().splitlines()[-lines:])


# -- models


def collect_model(name: str, store: ModelStore, wheelhouse: Path | None, models_dir: Path,
                  progress: Callable[[str], None]) -> ModelManifest:
    """One model into `models_dir/<name>/`, as its GGUF with its manifest beside it: copied from this computer's
    store when it is installed there, else pulled from the catalog (offline from `wheelhouse`, if given)."""
    from parrot_edge.store.manifest import manifest_path_for
    from parrot_edge.store.model_store import MANIFEST, STAMP, ModelStore

    directory = models_dir / name
    manifest = store.get(name)
    if manifest is not None:
        progress(f"{name}: from {store.models_dir}")
        directory.mkdir(parents=True)
        shutil.copyfile(store.gguf_path(manifest), directory / manifest.file)
    else:
        manifest = ModelStore(models_dir).pull(name, wheelhouse, progress=progress)
        for store_file in (MANIFEST, STAMP):  # the store's bookkeeping, not the stick's layout
            (directory / store_file).unlink()
    manifest.write(manifest_path_for(directory / manifest.file))
    return manifest


# -- the rest of the stick


def copy_packaging(staging: Path) -> None:
    from parrot_edge.resources import bundled_dir

    packaging = bundled_dir("packaging")
    (staging / "systemd").mkdir()
    for name in ("install.sh", "uninstall.sh", "config.toml", "systemd/parrot-edge.service",
                 "systemd/parrot-edge-kiosk.service"):
        shutil.copyfile(packaging / name, staging / name)
    for script in ("install.sh", "uninstall.sh"):
        (staging / script).chmod(0o755)


def write_checksums(root: Path) -> dict[str, str]:
    """SHA256SUMS in `sha256sum` format over every file under `root`; the sums by relative path."""
    from parrot_edge.store.manifest import sha256_file

    sums = {path.relative_to(root).as_posix(): sha256_file(path) for path in sorted(root.rglob("*")) if path.is_file()}
    (root / "SHA256SUMS").write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return sums


def teacher_readme(version: str, platform: str, pythons: list[str], models: list[str], glibc: str) -> str:
    # One text, kept whole and readable as the teacher will read it; its length is the README's, not logic's.
    title = f"parrot-edge {version}: AI for the classroom, with no internet"
    return f"""\
{title}
{"=" * len(title)}

This USB stick installs parrot-edge on an {platform} Linux computer with systemd, Python {_or(pythons)} (python3)
and glibc {glibc} or newer (`ldd --version` shows it). Models on it: {', '.join(models)}.


INSTALL

1. Plug the stick into the classroom computer and open a terminal (or press Ctrl+Alt+F2 and log in
   as an administrator).
2. Run, with the folder this file is in:

       sudo sh /media/.../parrot-edge/install.sh

   It first checks every file on the stick. If one is damaged or was changed, it stops without changing
   anything: make the stick again. Then it installs, which takes a few minutes, and ends with a check
   of the computer that says "Ready".
3. Write down the teacher PIN it shows, and restart the computer.


WHAT YOU WILL SEE

After the restart the first screen shows the classroom chat instead of a login prompt. Students type
a question and press Enter. After a few minutes without typing, the chat starts over for the next
student. Leaving the chat needs the teacher PIN. To use the computer as usual, press Ctrl+Alt+F2 and
log in there; Ctrl+Alt+F1 goes back to the chat.

    sudo parrot-edge doctor                  check the computer and the models
    sudo parrot-edge models list             the models installed
    /etc/parrot-edge/config.toml             the settings: language, model, …
    /etc/parrot-edge/kiosk.env               the teacher PIN
    sudo systemctl restart parrot-edge parrot-edge-kiosk     after changing either


UPDATE

Run install.sh from a newer stick the same way. The settings and the models stay; models on the new
stick are added, or replaced by their new version.


LAN MODE: OTHER DEVICES IN THE SCHOOL

The AI answers this computer only, and cannot reach the internet even if there is some. To let
tablets and laptops on the school network use it too, give install.sh the school's network:

    sudo sh install.sh --lan-subnet 192.168.1.0/24

Devices on that network then reach http://THIS-COMPUTER:8080/v1 (OpenAI-compatible) and must send the
key in /etc/parrot-edge/api-key, as the header "Authorization: Bearer KEY". Everything else stays
blocked. Back to this computer only: sudo sh install.sh --lan-subnet off


REMOVE

    sudo sh /opt/parrot-edge/uninstall.sh            keeps the models and the settings
    sudo sh /opt/parrot-edge/uninstall.sh --purge    removes everything
"""


def _or(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"
