"""Benchmark: one model hop through RabbitMQ, against raw pika moving the same bytes.

    .venv/bin/python bench/hop.py                 # 16 MB, 128 MB and 1 GB state dicts
    .venv/bin/python bench/hop.py --sizes 16,128  # sizes in MB

A hop is what a ring site does with a model: encode the state dict, publish it in confirmed
8 MiB chunks, and (in another process) consume, persist, verify digests and decode it. The
baseline, measured in the same run on the same broker, is raw pika: confirmed publishes of
the same bytes in the same 8 MiB messages, consumed and acked by another process. Prints the
time ratio and the receiving process's peak RSS above its idle RSS, against the model size.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pika
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from relay.codec import decode, encode
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
    print(json.dumps({"done": done, "idle_rss_mib": idle, "peak_rss_mib": rss_mib()}), flush=True)
    transport.close()


def receive_raw(vhost: str, messages: int) -> None:
    """Receiver process: raw pika, consume and ack ``messages`` messages."""
    connection = pika.BlockingConnection(pika.ConnectionParameters(virtual_host=vhost))
    channel = connection.channel()
    channel.basic_qos(prefetch_count=1)
    idle = current_rss_mib()
    print(json.dumps({"ready": True}), flush=True)
    stream = channel.consume("raw", inactivity_timeout=60)
    for seen, (method, _props, _body) in enumerate(stream, start=1):
        assert method is not None
        channel.basic_ack(method.delivery_tag)
        if seen == messages:
            break
    print(
        json.dumps({"done": time.time(), "idle_rss_mib": idle, "peak_rss_mib": rss_mib()}),
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


def raw_hop(vhost: str, payload: bytearray) -> tuple[float, dict[str, float]]:
    connection = pika.BlockingConnection(pika.ConnectionParameters(virtual_host=vhost))
    channel = connection.channel()
    channel.confirm_delivery()
    channel.queue_declare("raw", durable=True, arguments={"x-queue-type": "quorum"})
    view = memoryview(payload)
    chunks = [bytes(view[i : i + CHUNK]) for i in range(0, len(view), CHUNK)]
    receiver = start_receiver("raw", vhost, str(len(chunks)))
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
    payload = encode(state)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,128,1024", help="state dict sizes in MB")
    parser.add_argument("--receive", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.receive:
        kind, vhost, n = args.receive
        (receive_raw if kind == "raw" else receive_fedrelay)(vhost, int(n))
        return
    print(
        f"{'size':>8} {'raw s':>7} {'raw MB/s':>9} {'hop s':>7} {'hop MB/s':>9} "
        f"{'ratio':>6} {'recv RSS+':>10} {'RSS/model':>9}"
    )
    for size_mb in (int(s) for s in args.sizes.split(",")):
        vhost = f"fedrelay-bench-{uuid.uuid4().hex[:8]}"
        api("PUT", f"vhosts/{quote(vhost)}", {})
        api(
            "PUT",
            f"permissions/{quote(vhost)}/guest",
            {"configure": ".*", "write": ".*", "read": ".*"},
        )
        try:
            numel = size_mb * 1_000_000 // 4
            state = {f"layer{i}": torch.randn(numel // 8) for i in range(8)}
            model_bytes = sum(t.numel() * 4 for t in state.values())
            raw_s, _ = raw_hop(vhost, encode(state))
            hop_s, hop = fedrelay_hop(vhost, state)
            grown = hop["peak_rss_mib"] - hop["idle_rss_mib"]
            mb = model_bytes / 1e6
            print(
                f"{mb:>6.0f}MB {raw_s:>7.2f} {mb / raw_s:>9.0f} {hop_s:>7.2f} "
                f"{mb / hop_s:>9.0f} {hop_s / raw_s:>6.2f} {grown:>8.0f}MiB "
                f"{grown * MiB / model_bytes:>9.2f}",
                flush=True,
            )
        finally:
            api("DELETE", f"vhosts/{quote(vhost)}")


if __name__ == "__main__":
    main()
