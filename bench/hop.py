"""Benchmark: one model hop through RabbitMQ, against raw pika moving the same bytes.

    .venv/bin/python bench/hop.py                 # 16 MB, 128 MB and 1 GB state dicts
    .venv/bin/python bench/hop.py --sizes 16,128  # sizes in MB

A hop is what a ring site does with a model: encode the state dict, publish it in confirmed
8 MiB chunks, and (in another process) consume, persist, verify digests and decode it. The
baseline, measured in the same run on the same broker, is raw pika: confirmed publishes of
the same bytes in the same 8 MiB messages, consumed and acked by another process. A second
baseline, "durable", is the same raw pika receiver writing each message to a file and
fdatasyncing it before the ack: the least any receiver does that persists before it acks, as
fedrelay must (nothing acked may be lost). Each size runs ``--repeat`` times, the three
alternating, and the medians are reported, after one warm-up run.

Prints the hop's time against each baseline and the receiving process's peak RSS above its
idle RSS, against the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pika
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.codec import Encoding, decode, encode
from relay.envelope import ModelEnvelope
from relay.messaging import Inbox, Outbox
from relay.topology import Topology
from relay.transport.amqp import AmqpTransport, BrokerSettings
from tests.broker import api, quote

MiB = 1024 * 1024
CHUNK = 8 * MiB
PARTY = "guest"  # one broker user as sender and receiver: user_id checks still apply


def rss_mib() -> float:
    """Peak resident set size of this process so far, MiB.

    VmHWM, not getrusage's ru_maxrss: the latter survives execve and so reports the peak of
    the parent that spawned this receiver.
    """
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MiB


def receive_fedrelay(vhost: str, count: int) -> None:
    """Receiver process: one fedrelay hop."""
    topology = Topology("bench", (PARTY,))
    transport = AmqpTransport(BrokerSettings(vhost=vhost))
    idle = current_rss_mib()
    print(json.dumps({"ready": True}), flush=True)
    cpu = time.process_time()
    with tempfile.TemporaryDirectory() as spool:
        inbox = Inbox(owner=PARTY, spool=Path(spool))
        received = None
        while received is None:
            delivery = transport.get(topology.site_queue(PARTY), timeout=60)
            assert delivery is not None
            received = inbox.receive(delivery)
            transport.ack(delivery)
        state = decode(received.payload)
        total = sum(t.numel() for t in state.values())
        assert total == count
        done = time.time()
    report = {"done": done, "cpu_s": time.process_time() - cpu}
    print(json.dumps(report | {"idle_rss_mib": idle, "peak_rss_mib": rss_mib()}), flush=True)
    transport.close()


def receive_raw(vhost: str, messages: int, *, durable: bool = False) -> None:
    """Receiver process: raw pika, consume and ack ``messages`` messages; when ``durable``,
    write each to a file and fdatasync it before its ack."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(virtual_host=vhost))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    idle = current_rss_mib()
    print(json.dumps({"ready": True}), flush=True)
    cpu = time.process_time()
    stream = channel.consume("raw", inactivity_timeout=60)
    with tempfile.TemporaryFile() as spool:
        offset = 0
        for seen, (method, _props, body) in enumerate(stream, start=1):
            assert method is not None and body is not None
            if durable:
                offset += os.pwrite(spool.fileno(), body, offset)
                os.fdatasync(spool.fileno())
            channel.basic_ack(method.delivery_tag)
            if seen == messages:
                break
    print(
        json.dumps(
            {"done": time.time(), "cpu_s": time.process_time() - cpu}
            | {"idle_rss_mib": idle, "peak_rss_mib": rss_mib()}
        ),
        flush=True,
    )
    connection.close()


def start_receiver(*args: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, __file__, "--receive", *args], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    assert json.loads(process.stdout.readline())["ready"]
    return process


def finish(process: subprocess.Popen[str]) -> dict[str, float]:
    assert process.stdout is not None
    result: dict[str, float] = json.loads(process.stdout.readline())
    process.wait()
    return result


def raw_hop(
    vhost: str, payload: bytearray, *, durable: bool = False
) -> tuple[float, dict[str, float]]:
    connection = pika.BlockingConnection(pika.ConnectionParameters(virtual_host=vhost))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare("raw", durable=True, arguments={"x-queue-type": "quorum"})
    view = memoryview(payload)
    chunks = [bytes(view[i : i + CHUNK]) for i in range(0, len(view), CHUNK)]
    receiver = start_receiver("durable" if durable else "raw", vhost, str(len(chunks)))
    start = time.time()
    properties = pika.BasicProperties(delivery_mode=2)
    for chunk in chunks:
        channel.basic_publish("", "raw", chunk, properties, mandatory=True)
    result = finish(receiver)
    connection.close()
    return result["done"] - start, result


def fedrelay_hop(vhost: str, state: dict[str, torch.Tensor]) -> tuple[float, dict[str, float]]:
    topology = Topology("bench", (PARTY,))
    transport = AmqpTransport(BrokerSettings(vhost=vhost))
    transport.declare(topology)
    count = sum(t.numel() for t in state.values())
    receiver = start_receiver("fedrelay", vhost, str(count))
    start = time.time()
    payload = Encoding(state)
    Outbox(transport, topology, sender=PARTY).send(
        ModelEnvelope,
        payload,
        chunk_size=CHUNK,
        job_id="bench",
        algorithm="cwt",
        recipient=PARTY,
        hop=1,
    )
    result = finish(receiver)
    transport.close()
    return result["done"] - start, result


def fresh_vhost() -> str:
    vhost = f"fedrelay-bench-{uuid.uuid4().hex[:8]}"
    api("PUT", f"vhosts/{quote(vhost)}", {})
    api(
        "PUT", f"permissions/{quote(vhost)}/guest", {"configure": ".*", "write": ".*", "read": ".*"}
    )
    return vhost


@dataclass
class Figures:
    raw_s: float
    durable_s: float
    hop_s: float
    grown_mib: float
    model_bytes: int


def measure(size_mb: int, repeat: int) -> Figures:
    """Median raw, durable and fedrelay hop times over ``repeat`` alternating runs, each in a
    fresh vhost; the largest receiver RSS growth of the fedrelay runs."""
    numel = size_mb * 1_000_000 // 4
    state = {f"layer{i}": torch.randn(numel // 8) for i in range(8)}
    raw, durable, hop, grown = [], [], [], 0.0
    for _ in range(repeat):
        vhost = fresh_vhost()
        try:
            payload = encode(state)
            raw.append(raw_hop(vhost, payload)[0])
            durable.append(raw_hop(vhost, payload, durable=True)[0])
            hop_s, report = fedrelay_hop(vhost, state)
        finally:
            api("DELETE", f"vhosts/{quote(vhost)}")
        hop.append(hop_s)
        grown = max(grown, report["peak_rss_mib"] - report["idle_rss_mib"])
    model_bytes = sum(t.numel() * 4 for t in state.values())
    median = statistics.median
    return Figures(median(raw), median(durable), median(hop), grown, model_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,128,1024", help="state dict sizes in MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per size (median reported)")
    parser.add_argument("--receive", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        kind, vhost, n = args.receive
        if kind == "fedrelay":
            receive_fedrelay(vhost, int(n))
        else:
            receive_raw(vhost, int(n), durable=kind == "durable")
        return
    # Warm up both paths once (the broker's and this machine's first-touch memory costs).
    measure(64, 1)
    print(
        f"{'size':>8} {'raw s':>6} {'raw MB/s':>8} {'durable s':>9} {'hop s':>6} "
        f"{'hop MB/s':>8} {'hop/raw':>7} {'hop/durable':>11} {'recv RSS+':>9} {'RSS/model':>9}"
    )
    for size_mb in (int(s) for s in args.sizes.split(",")):
        f = measure(size_mb, args.repeat)
        mb = f.model_bytes / 1e6
        print(
            f"{mb:>6.0f}MB {f.raw_s:>6.2f} {mb / f.raw_s:>8.0f} {f.durable_s:>9.2f} "
            f"{f.hop_s:>6.2f} {mb / f.hop_s:>8.0f} {f.hop_s / f.raw_s:>7.2f} "
            f"{f.hop_s / f.durable_s:>11.2f} {f.grown_mib:>7.0f}MiB "
            f"{f.grown_mib * MiB / f.model_bytes:>9.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
