"""The tensor codec: exact round trips for every dtype, zero-copy decode, refusal of bad input."""

from __future__ import annotations

import msgpack
import pytest
import torch

from relay.codec import DTYPES, decode, digest, encode
from relay.errors import CodecError


def sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    if dtype is torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=gen, dtype=dtype)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(0, 100, shape, generator=gen).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (float8 has no torch.equal)."""
    flat = (a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(*flat)


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_every_dtype_round_trips_exactly(name: str) -> None:
    dtype = DTYPES[name]
    state = {"w": sample(dtype), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 4))}
    out = decode(encode(state))
    assert list(out) == list(state)
    for key, tensor in state.items():
        assert same(out[key], tensor)


def test_non_contiguous_and_strided_tensors_round_trip() -> None:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {"t": base.t(), "slice": base[:, ::2]}
    out = decode(encode(state))
    assert torch.equal(out["t"], base.t())
    assert torch.equal(out["slice"], base[:, ::2])


def test_decode_of_writable_buffer_shares_memory_and_is_aligned() -> None:
    payload = encode({"a": torch.randn(1000), "b": torch.randn(7)})
    out = decode(payload)
    start = torch.frombuffer(payload, dtype=torch.uint8).data_ptr()
    for tensor in out.values():
        assert start <= tensor.data_ptr() < start + len(payload)
        assert (tensor.data_ptr() - start) % 64 == 0  # aligned within the payload
    out["a"][0] = 42.0  # writes land in the buffer: no hidden copy was made
    assert decode(payload)["a"][0] == 42.0


def test_decode_of_read_only_bytes_gives_independent_tensors() -> None:
    original = torch.randn(100)
    payload = bytes(encode({"a": original}))
    out = decode(payload)
    out["a"].add_(1.0)
    assert torch.equal(decode(payload)["a"], original)


def test_300_mb_state_dict_round_trips() -> None:
    state = {f"layer{i}.weight": torch.randn(5_000_000) for i in range(15)}
    payload = encode(state)
    assert len(payload) > 300_000_000
    out = decode(payload)
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert digest(payload) == digest(memoryview(payload))


def test_digest_is_sha256_hex() -> None:
    assert digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


@pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")
def test_unsupported_dtype_and_layout_are_named_on_encode() -> None:
    with pytest.raises(CodecError, match=r"tensor 'q'.*complex32"):
        encode({"q": torch.zeros(2, dtype=torch.complex32)})
    with pytest.raises(CodecError, match=r"tensor 's'.*to_dense"):
        encode({"s": torch.eye(3).to_sparse()})


def test_conjugate_and_negative_views_are_encoded_as_their_values() -> None:
    z = torch.randn(4, dtype=torch.complex64)
    out = decode(encode({"conj": z.conj(), "neg": z.conj().imag}))
    assert torch.equal(out["conj"], z.conj().resolve_conj())
    assert torch.equal(out["neg"], z.conj().imag.resolve_neg())


def test_non_tensor_value_is_refused_on_encode() -> None:
    with pytest.raises(CodecError, match=r"expected str -> torch\.Tensor"):
        encode({"x": [1, 2, 3]})  # type: ignore[dict-item]


def forged(entries: list[list[object]], blob: bytes) -> bytes:
    head = msgpack.packb({"format": "fedrelay.tensors", "version": 1, "tensors": entries})
    return head + b"\xc6" + len(blob).to_bytes(4, "big") + blob


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "expected a msgpack map header first"),
        (b"\x81\xa1", "not valid msgpack"),
        (msgpack.packb({"format": "x"}) + b"\xc6\x00\x00\x00\x00", "tensor payload header.format"),
        (forged([["a", "float32", [2], 0, 8]], b"\0" * 8)[:-1], "truncated"),
        (forged([["a", "float32", [2], 0, 8]], b"\0" * 8) + b"!", "trailing"),
        (forged([["a", "pickle", [2], 0, 8]], b"\0" * 8), "unknown dtype 'pickle'"),
        (forged([["a", "float32", [3], 0, 8]], b"\0" * 8), "needs 12 bytes"),
        (forged([["a", "float32", [2], 4, 8]], b"\0" * 8), "outside"),
        (forged([["a", "float32", [-2], 0, 8]], b"\0" * 8), "greater than or equal to 0"),
        (forged([["a", "int8", [1], 0, 1], ["a", "int8", [1], 1, 1]], b"\0\0"), "twice"),
        (forged([["a", "int8", [2**62, 2**62, 0], 0, 0]], b""), "less than or equal to"),
        (forged([["a", "int8", [1] * 17, 0, 1]], b"\0"), "at most 16 items"),
        (b"\x91\xc0" + b"\xc6\x00\x00\x00\x00", "expected a msgpack map header first"),
        (b"\xdf\x00\x10\x00\x00" + b"\x80" * 10, "not valid msgpack within its limits"),
        (b"\x81\xa1t\xdd\x00\x20\x00\x00" + b"\x90" * 0x200000, "not valid msgpack"),
        (msgpack.packb({"format": "fedrelay.tensors"}), "bin32"),
    ],
)
def test_malformed_payloads_are_refused_with_a_reason(payload: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode(payload)


def test_a_header_that_would_expand_into_millions_of_objects_is_refused_early() -> None:
    # 3 MB on the wire, 3 million empty maps once decoded: refused by the value budget.
    count = 3_000_000
    hostile = b"\x81\xa1t\xdd" + count.to_bytes(4, "big") + b"\x80" * count
    with pytest.raises(CodecError, match=r"too many values|within its limits"):
        decode(hostile + b"\xc6\x00\x00\x00\x00")
