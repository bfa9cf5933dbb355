"""Is this GGUF whole? Its structure, and its sha256 when a manifest says what it should be.

A model copied from a USB stick that was pulled out too early, or an SD card that flipped a bit, must be
refused with a message naming the file and the damage, before llama.cpp maps it. The structural check
walks the header (magic, version, key/values, tensor infos) and checks that every tensor's data lies
inside the file, which catches truncation in milliseconds; the sha256 catches everything else.

The header is read here rather than with gguf-py's GGUFReader: that reader trusts the lengths it reads
(a damaged array length sends it into a near-endless loop) and takes ~3 s to turn the default model's
49k-token vocabulary into numpy arrays, while this walk takes a few tens of milliseconds (it skips over
the vocabulary's strings, keeping their count). gguf-py still supplies the tensor types and block sizes.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from parrot_edge.errors import ParrotEdgeError
from parrot_edge.store.manifest import sha256_file

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF value type → struct format, for the fixed-size types (8 is string, 9 is array).
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
_TensorEntry = tuple[str, tuple[int, ...], int, int]  # name, shape, ggml type, offset in the data section


@dataclass(frozen=True)
class StringArray:
    """An array of strings in the metadata (a vocabulary, its merges), kept as its length only."""

    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]
    n_elements: int
    start: int  # absolute byte offset of the data in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # strings, numbers, bools, lists of numbers, StringArray
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int


class _Damaged(Exception):
    """A header read that runs past the end of the file or makes no sense; turned into a clear error."""


class _HeaderReader:
    """Little-endian reads from the start of a mapped file that never go past its end."""

    def __init__(self, data: mmap.mmap, pos: int):
        self.data = data
        self.pos = pos

    def take(self, nbytes: int, what: str) -> bytes:
        if nbytes > len(self.data) - self.pos:
            raise _Damaged(f"{what} at byte {self.pos:,} needs {nbytes:,} bytes but the file ends at "
                           f"byte {len(self.data):,}")
        self.pos += nbytes
        return self.data[self.pos - nbytes:self.pos]

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))[0]

    def string(self, what: str) -> str:
        return self.take(self.unpack("Q", what), what).decode("utf-8", errors="replace")

    def value(self, value_type: int, what: str) -> Any:
        if value_type == _STRING:
            return self.string(what)
        if value_type in _SCALAR_FORMATS:
            return self.unpack(_SCALAR_FORMATS[value_type], what)
        if value_type != _ARRAY:
            raise _Damaged(f"{what} has unknown value type {value_type}")
        item_type = self.unpack("I", what)
        count = self.unpack("Q", what)
        if item_type in _SCALAR_FORMATS:  # numeric arrays in one read
            item = _SCALAR_FORMATS[item_type]
            return list(struct.unpack(f"<{count}{item}", self.take(count * struct.calcsize(item), what)))
        if item_type == _STRING:
            self.skip_strings(count, what)
            return StringArray(count)
        raise _Damaged(f"{what} is an array of unsupported type {item_type}")

    def skip_strings(self, count: int, what: str) -> None:
        # The hot loop of the walk (a vocabulary has 50k-250k strings): no decoding, no method calls.
        data, pos, end = self.data, self.pos, len(self.data)
        for _ in range(count):
            if pos + 8 > end:
                pos = end + 1  # a length field cut off by the end of the file
                break
            pos += 8 + struct.unpack_from("<Q", data, pos)[0]
        if pos > end:
            raise _Damaged(f"{what} at byte {self.pos:,} runs past the end of the file at byte {end:,}")
        self.pos = pos


def read_header(path: Path) -> GGUFHeader:
    """The metadata and tensor layout of a GGUF, or a ParrotEdgeError saying what is wrong with the file."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
            if magic != GGUF_MAGIC:
                found = f"it starts with {magic!r}" if magic else "it is empty"
                raise ParrotEdgeError(f"{path} is not a GGUF file ({found}, not b'GGUF')")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                reader = _HeaderReader(mapped, pos=len(GGUF_MAGIC))
                version = reader.unpack("I", "version")
                if version not in SUPPORTED_VERSIONS:
                    raise ParrotEdgeError(f"{path} is GGUF version {version}; parrot-edge reads versions "
                                          f"{SUPPORTED_VERSIONS[0]} and {SUPPORTED_VERSIONS[1]} "
                                          "(or the header is damaged)")
                metadata, layout = _walk_header(reader)
                header_end, file_size = reader.pos, len(mapped)
    except OSError as exc:
        raise ParrotEdgeError(f"cannot read {path}: {exc.strerror or exc}") from None
    except _Damaged as exc:
        raise ParrotEdgeError(f"{path} is damaged or truncated: its header is unreadable ({exc})") from None

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ParrotEdgeError(f"{path} is damaged: general.alignment is {alignment!r}, not a power of two")
    data_offset = -(-header_end // alignment) * alignment
    tensors = [_place_tensor(path, entry, data_offset, alignment, file_size) for entry in layout]
    return GGUFHeader(version, metadata, tensors, data_offset, file_size)


def _walk_header(reader: _HeaderReader) -> tuple[dict[str, Any], list[_TensorEntry]]:
    """The key/values, then every tensor's entry, as stored after the version."""
    tensor_count = reader.unpack("Q", "tensor count")
    kv_count = reader.unpack("Q", "key/value count")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = reader.string(f"key #{index}")
        metadata[key] = reader.value(reader.unpack("I", f"type of {key}"), key)
    layout = []
    for index in range(tensor_count):
        name = reader.string(f"name of tensor #{index}")
        n_dims = reader.unpack("I", f"dimensions of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Damaged(f"tensor {name!r} claims {n_dims} dimensions")
        shape = tuple(reader.unpack("Q", f"shape of {name}") for _ in range(n_dims))
        layout.append((name, shape, reader.unpack("I", f"type of {name}"), reader.unpack("Q", f"offset of {name}")))
    return metadata, layout


def _place_tensor(path: Path, entry: _TensorEntry, data_offset: int, alignment: int, file_size: int) -> TensorInfo:
    """Where a tensor's data lies, refusing a tensor that is malformed or runs past the end of the file."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    name, shape, ggml_type, offset = entry
    try:
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise ParrotEdgeError(f"{path} is damaged or too new: tensor {name!r} has unknown type {ggml_type}") \
            from None
    if shape[0] % block_size or offset % alignment:
        raise ParrotEdgeError(f"{path} is damaged: tensor {name!r} (shape {list(shape)}, offset {offset:,}) "
                              f"does not fit its type's {block_size}-element blocks and {alignment}-byte alignment")
    n_elements = 1
    for dim in shape:
        n_elements *= dim
    start, nbytes = data_offset + offset, n_elements // block_size * block_bytes
    if start + nbytes > file_size:
        raise ParrotEdgeError(f"{path} is truncated: it has {file_size:,} bytes, but tensor {name!r} needs bytes "
                              f"{start:,} to {start + nbytes:,} (a copy or download that stopped early?)")
    return TensorInfo(name, ggml_type, shape, n_elements, start, nbytes)


def check_gguf(path: Path, expected_sha256: str | None = None) -> GGUFHeader:
    """Refuse a GGUF that is not whole: structure always, and the sha256 when it is known."""
    header = read_header(path)
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise ParrotEdgeError(f"{path} is corrupted: its sha256 is {actual[:16]}…, but its manifest says "
                                  f"{expected_sha256[:16]}… (the file was damaged or replaced)")
    return header
