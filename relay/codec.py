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
from collections.abc import Mapping
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
    "bool": torch.bool,
}
"""Every dtype the codec carries, by its wire name."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}

NonNegative = Annotated[int, Field(ge=0)]


class TensorHeader(Frozen):
    """The header in front of the tensor bytes."""

    format: Literal["fedrelay.tensors"]
    version: Literal[1]
    tensors: list[tuple[str, str, list[NonNegative], NonNegative, NonNegative]]
    pad: bytes = b""


def digest(payload: bytes | bytearray | memoryview) -> str:
    """sha256 of a payload, lower-case hex."""
    return hashlib.sha256(payload).hexdigest()


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def encode(state: Mapping[str, torch.Tensor]) -> bytearray:
    """Encode a state dict; tensors on any device, any layout, in any of :data:`DTYPES`."""
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
        tensor = value.detach().to("cpu").contiguous()
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
    if offset:
        target = torch.frombuffer(out, dtype=torch.uint8)
        for start, tensor in parts:
            if tensor.numel():
                begin = base + start
                target[begin : begin + tensor.numel() * tensor.element_size()].copy_(
                    _as_bytes(tensor)
                )
    return out


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


def read_head(buffer: Buffer, *, what: str) -> tuple[object, memoryview]:
    """Split ``msgpack object + bin32`` into the decoded object and a view of the bin's bytes.

    Raises CodecError when the buffer is not exactly that, naming ``what`` it was meant to be.
    """
    view = memoryview(buffer).cast("B")
    unpacker = msgpack.Unpacker(
        _Reader(view), raw=False, read_size=64 * 1024, max_buffer_size=64 * 1024 * 1024
    )
    try:
        head = unpacker.unpack()
    except (msgpack.OutOfData, msgpack.UnpackException, ValueError, TypeError) as e:
        raise CodecError(
            f"{what}: the header is not valid msgpack ({type(e).__name__}: {e})"
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
    head, blob = read_head(buffer, what="tensor payload")
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
        if count == 0:
            state[name] = torch.empty(shape, dtype=dtype)
            continue
        with warnings.catch_warnings():
            # frombuffer warns on read-only memory; such tensors are cloned right below.
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(blob, dtype=torch.uint8, count=nbytes, offset=offset)
        tensor = flat.view(dtype).reshape(shape)
        state[name] = tensor if writable else tensor.clone()
    return state
