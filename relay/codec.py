"""Tensor codec: a state dict as msgpack, decoded without copying where the buffer allows.

Layout (a valid msgpack stream of two objects)::

    header map  {"format": "fedrelay.tensors", "version": 1,
                 "tensors": [[name, dtype, shape, offset, nbytes], ...], "pad": bin}
    bin32       all tensor bytes, each tensor at a 64-byte aligned offset

The header's ``pad`` makes the blob start 64-byte aligned too, so decoding a writable buffer
(a bytearray, or an mmap of a spooled file) gives tensors that share its memory. There is no
pickle anywhere: a payload can only ever become tensors of the listed dtypes.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import struct
import warnings
from collections.abc import Iterator, Mapping
from typing import Annotated, Literal

import msgpack
import torch
from pydantic import Field

from relay.errors import CodecError, EnvelopeError
from relay.jobspec import Frozen
from relay.validation import parse

Buffer = bytes | bytearray | memoryview | mmap.mmap
"""Anything a payload can be read from; a spooled payload is an mmap."""

StateDict = dict[str, torch.Tensor]
"""A model's weights by parameter name."""

FORMAT = "fedrelay.tensors"
VERSION = 1
ALIGN = 64
_BIN32 = 0xC6
_MAX_BLOB = 2**32 - 1

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "complex64": torch.complex64,
    "complex128": torch.complex128,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "uint16": torch.uint16,
    "uint32": torch.uint32,
    "uint64": torch.uint64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
    "bool": torch.bool,
}
"""Every dtype the codec carries, by its wire name."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}

NonNegative = Annotated[int, Field(ge=0)]
Dimension = Annotated[int, Field(ge=0, le=2**40)]

MAX_TENSORS = 200_000
"""Tensors one payload may hold; far more than any model has."""

TENSOR_HEADER_LIMITS = {"max_header": 64 * 1024 * 1024, "max_items": 2_000_000}
"""A tensor payload's header: at most this many bytes, and this many msgpack values in all."""


class TensorHeader(Frozen):
    """The header in front of the tensor bytes."""

    format: Literal["fedrelay.tensors"]
    version: Literal[1]
    tensors: list[
        tuple[str, str, Annotated[list[Dimension], Field(max_length=16)], NonNegative, NonNegative]
    ] = Field(max_length=MAX_TENSORS)
    pad: bytes = b""


def digest(payload: bytes | bytearray | memoryview | mmap.mmap) -> str:
    """sha256 of a payload, lower-case hex."""
    return hashlib.sha256(payload).hexdigest()


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def encode(state: Mapping[str, torch.Tensor]) -> bytearray:
    """Encode a state dict; tensors on any device, any layout, in any of :data:`DTYPES`."""
    encoding = Encoding(state)
    for _ in encoding.fill():
        pass
    return encoding.payload


class Encoding:
    """A state dict being encoded: :attr:`payload` is allocated and its header written at once,
    and :meth:`fill` copies the tensors in, in order, so that a sender can publish the first
    chunks while later tensors are still being copied."""

    def __init__(self, state: Mapping[str, torch.Tensor]) -> None:
        self.payload, self._parts = _plan(state)

    def fill(self) -> Iterator[int]:
        """Copy the tensors in; after each, yield how many leading payload bytes are final."""
        if self._parts:
            target = torch.frombuffer(self.payload, dtype=torch.uint8)
            for begin, tensor in self._parts:
                target[begin : begin + tensor.numel() * tensor.element_size()].copy_(
                    _as_bytes(tensor)
                )
                yield begin + tensor.numel() * tensor.element_size()
        self._parts = []
        yield len(self.payload)


def _plan(state: Mapping[str, torch.Tensor]) -> tuple[bytearray, list[tuple[int, torch.Tensor]]]:
    """The payload buffer with its header written, and where each tensor goes in it."""
    entries: list[list[object]] = []
    parts: list[tuple[int, torch.Tensor]] = []
    offset = 0
    for name, value in state.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise CodecError(
                f"state dict entry {name!r}: expected str -> torch.Tensor, "
                f"got {type(name).__name__} -> {type(value).__name__}"
            )
        dtype_name = _NAMES.get(value.dtype)
        if dtype_name is None:
            raise CodecError(
                f"tensor {name!r}: dtype {value.dtype} is not carried; "
                f"convert it to one of {', '.join(DTYPES)}"
            )
        if value.layout is not torch.strided:
            raise CodecError(
                f"tensor {name!r}: {value.layout} tensors are not carried; convert it with "
                ".to_dense() first"
            )
        tensor = value.detach().to("cpu").resolve_conj().resolve_neg().contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        offset = _aligned(offset)
        entries.append([name, dtype_name, list(tensor.shape), offset, nbytes])
        parts.append((offset, tensor))
        offset += nbytes
    if offset > _MAX_BLOB:
        raise CodecError(f"state dict of {offset} bytes exceeds the codec's 4 GiB limit")
    header = {"format": FORMAT, "version": VERSION, "tensors": entries, "pad": b""}
    head = msgpack.packb(header, use_bin_type=True)
    # 'pad' is a bin8 whose prefix is 2 bytes for any length < 256, so growing it by k bytes
    # grows the header by exactly k: that aligns the blob to ALIGN.
    header["pad"] = bytes((-(len(head) + 5)) % ALIGN)
    head = msgpack.packb(header, use_bin_type=True)
    base = len(head) + 5
    out = bytearray(base + offset)
    out[: len(head)] = head
    struct.pack_into(">BI", out, len(head), _BIN32, offset)
    return out, [(base + start, tensor) for start, tensor in parts if tensor.numel()]


class _Reader:
    """A file-like view for msgpack.Unpacker that copies only what it reads."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.position = 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.view) if n < 0 else min(len(self.view), self.position + n)
        chunk = bytes(self.view[self.position : end])
        self.position = end
        return chunk


class _Budget:
    """Counts decoded msgpack containers' items, so a tiny hostile header cannot expand into
    millions of Python objects."""

    def __init__(self, limit: int, what: str) -> None:
        self.left = limit
        self.what = what

    def spend(self, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise CodecError(f"{self.what}: the header holds too many values")

    def on_list(self, items: list[object]) -> list[object]:
        self.spend(len(items) + 1)
        return items

    def on_map(self, pairs: list[tuple[object, object]]) -> dict[object, object]:
        self.spend(2 * len(pairs) + 1)
        return dict(pairs)


def read_head(
    buffer: Buffer, *, what: str, max_header: int = 1024 * 1024, max_items: int = 4096
) -> tuple[object, memoryview]:
    """Split ``msgpack map + bin32`` into the decoded map and a view of the bin's bytes.

    The header may be at most ``max_header`` bytes and hold at most ``max_items`` values.
    Raises CodecError when the buffer is not exactly that, naming ``what`` it was meant to be.
    """
    view = memoryview(buffer).cast("B")
    if not view or not (0x80 <= view[0] <= 0x8F or view[0] in (0xDE, 0xDF)):
        raise CodecError(f"{what}: expected a msgpack map header first; this is not fedrelay's")
    budget = _Budget(max_items, what)
    limit = min(max_header, max_items)
    unpacker = msgpack.Unpacker(
        _Reader(view),
        raw=False,
        read_size=min(64 * 1024, max_header),
        max_buffer_size=max_header,
        max_str_len=max_header,
        max_bin_len=max_header,
        max_array_len=limit,
        max_map_len=limit,
        max_ext_len=0,
        list_hook=budget.on_list,
        object_pairs_hook=budget.on_map,
        strict_map_key=True,
    )
    try:
        head = unpacker.unpack()
    except CodecError:
        raise
    except (msgpack.OutOfData, msgpack.UnpackException, ValueError, TypeError) as e:
        raise CodecError(
            f"{what}: the header is not valid msgpack within its limits ({type(e).__name__}: {e})"
        ) from e
    start = unpacker.tell()
    if len(view) < start + 5 or view[start] != _BIN32:
        raise CodecError(f"{what}: expected a bin32 body after the header at byte {start}")
    (size,) = struct.unpack_from(">I", view, start + 1)
    if start + 5 + size != len(view):
        raise CodecError(
            f"{what}: body declares {size} bytes but {len(view) - start - 5} follow the header; "
            "the payload is truncated or has trailing bytes"
        )
    return head, view[start + 5 :]


def decode(buffer: Buffer) -> StateDict:
    """Decode a payload made by :func:`encode`.

    Tensors share memory with ``buffer`` when it is writable (bytearray, mmap); a read-only
    buffer (bytes) is copied tensor by tensor, since torch must not alias read-only memory.
    """
    head, blob = read_head(buffer, what="tensor payload", **TENSOR_HEADER_LIMITS)
    try:
        header = parse(TensorHeader, head, what="tensor payload header")
    except EnvelopeError as e:
        raise CodecError(str(e)) from e
    writable = not blob.readonly
    state: StateDict = {}
    for name, dtype_name, shape, offset, nbytes in header.tensors:
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise CodecError(
                f"tensor {name!r}: unknown dtype {dtype_name!r}; "
                f"expected one of {', '.join(DTYPES)}"
            )
        if name in state:
            raise CodecError(f"tensor {name!r} appears twice in the payload")
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if count * itemsize != nbytes:
            raise CodecError(
                f"tensor {name!r}: shape {shape} of {dtype_name} needs {count * itemsize} bytes, "
                f"header says {nbytes}"
            )
        if offset + nbytes > len(blob):
            raise CodecError(
                f"tensor {name!r}: bytes {offset}..{offset + nbytes} lie outside the "
                f"{len(blob)}-byte body"
            )
        try:
            state[name] = _tensor(blob, dtype, shape, offset, nbytes, writable=writable)
        except (RuntimeError, ValueError) as e:
            raise CodecError(f"tensor {name!r}: cannot be built ({e})") from e
    return state


def _tensor(
    blob: memoryview,
    dtype: torch.dtype,
    shape: list[int],
    offset: int,
    nbytes: int,
    *,
    writable: bool,
) -> torch.Tensor:
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():
        # frombuffer warns on read-only memory; such tensors are cloned right below.
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(blob, dtype=torch.uint8, count=nbytes, offset=offset)
    tensor = flat.view(dtype).reshape(shape)
    return tensor if writable else tensor.clone()
