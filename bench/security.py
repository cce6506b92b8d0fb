"""Benchmark: what signing and end-to-end encryption cost, against copying the same bytes.

    .venv/bin/python bench/security.py               # 16 and 128 MB payloads
    .venv/bin/python bench/security.py --sizes 16    # sizes in MB

Per envelope, signing and verifying (Ed25519 over the header, as every message is) in µs.
Per payload, sealing (X25519 + HKDF + AES-256-GCM, and the plaintext's HMAC) and opening, as
a ratio to one memcpy of the same bytes measured in the same run, and in GB/s. Medians of
``--repeat`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.envelope import ModelEnvelope, to_wire
from relay.messaging import sign
from relay.security import Security, generate


def median_s(work: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``work``, after one warm-up call."""
    work()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,128", help="payload sizes in MB, comma-separated")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        parser.error(f"--sizes: expected MB as integers separated by commas, got {args.sizes!r}")
    if args.repeat < 1 or any(s < 1 for s in sizes):
        parser.error("--repeat and every size must be at least 1")
    roster, identities = generate("bench", ["aggregator", "site-1"], encrypt_payloads=True)
    sender = Security(identities["aggregator"], roster)
    receiver = Security(identities["site-1"], roster)
    header = ModelEnvelope(
        job_id="bench",
        algorithm="cwt",
        sender="aggregator",
        recipient="site-1",
        payload_digest="0" * 64,
        payload_size=0,
    )
    signed = to_wire(sign(header, sender))
    n = 2000
    sign_us = median_s(lambda: [sign(header, sender) for _ in range(n)], 3) / n * 1e6
    verify_us = median_s(lambda: [receiver.verify(signed, "aggregator") for _ in range(n)], 3)
    print(f"sign an envelope: {sign_us:.0f} µs; verify: {verify_us / n * 1e6:.0f} µs")
    print("size MB | memcpy s | seal s (× memcpy, GB/s) | open s (× memcpy, GB/s)")
    for size in sizes:
        payload = bytearray(size * 2**20)
        payload[::4096] = b"\x01" * len(payload[::4096])
        copy_s = median_s(lambda: bytearray(payload), args.repeat)  # noqa: B023
        sealed = sender.seal(payload, recipient="site-1", job_id="bench")
        seal_s = median_s(
            lambda: sender.seal(payload, recipient="site-1", job_id="bench"),  # noqa: B023
            args.repeat,
        )
        open_s = median_s(
            lambda: receiver.open(sealed[0], sealed[1], sender="aggregator", job_id="bench"),  # noqa: B023
            args.repeat,
        )
        gb = len(payload) / 1e9
        print(
            f"{size:7d} | {copy_s:8.3f} | {seal_s:.3f} ({seal_s / copy_s:.1f}×, "
            f"{gb / seal_s:.2f}) | {open_s:.3f} ({open_s / copy_s:.1f}×, {gb / open_s:.2f})"
        )


if __name__ == "__main__":
    main()
