"""Model lineage: a signed record of every step that made a job's final model.

Each step is a :class:`~relay.envelope.LineageEnvelope` signed by the party that took it: the
aggregator's ``initial`` model, each site's ``train`` (the model it started from → the model
it sent on, its case counts and scores), each FedAvg ``aggregate`` (the updates → the next
global model), and the ``final`` model. Models are named by :func:`model_digest`, which does
not depend on how they were encoded, so an auditor can recompute it from the saved file.

:func:`verify` checks a lineage offline against the federation's roster: every record signed
by its sender, every step's inputs made by an earlier step, and the final model, as saved,
descending from the initial one through signed steps only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from relay.codec import StateDict
from relay.envelope import AGGREGATOR, LineageEnvelope, parse_envelope
from relay.errors import EnvelopeError, InvalidInput
from relay.security import Verifier

EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()
"""The payload digest of a lineage record, which has no payload."""

AGGREGATOR_STEPS = ("initial", "aggregate", "final")
"""Steps only the aggregator takes; sites take ``train``."""


def model_digest(state: StateDict) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order."""
    sha = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().contiguous().cpu()
        sha.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
        sha.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return sha.hexdigest()


@dataclass
class Verdict:
    """What :func:`verify` found: ``problems`` is empty when the lineage holds."""

    records: int = 0
    steps: dict[str, int] = field(default_factory=dict)
    parties: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    unsigned: int = 0

    @property
    def ok(self) -> bool:
        """True when every check passed."""
        return not self.problems


def verify(
    records: Sequence[dict[str, Any]],
    *,
    model: str,
    verifier: Verifier | None,
    sites: Iterable[str] | None = None,
) -> Verdict:
    """Check ``records`` (wire dicts, in the order they were recorded) against the roster's
    ``verifier`` and ``model``, the :func:`model_digest` of the final model as saved.

    Without a verifier signatures cannot be checked: each record counts as unsigned, which is
    a problem (an unprovisioned federation's lineage proves nothing about who did what).
    """
    verdict = Verdict(records=len(records))
    allowed = None if sites is None else set(sites)
    made: set[str] = set()
    parents: dict[str, set[str]] = {}
    envelopes: list[LineageEnvelope] = []
    jobs: set[str] = set()
    for index, record in enumerate(records):
        where = f"record {index}"
        try:
            envelope = parse_envelope(record)
            if not isinstance(envelope, LineageEnvelope):
                raise EnvelopeError(f"envelope.kind: {envelope.kind}, not lineage")
            if verifier is None:
                verdict.unsigned += 1
            else:
                verifier.verify(dict(record), envelope.sender)
        except InvalidInput as e:
            verdict.problems.append(f"{where}: {e}")
            continue
        where += f" ({envelope.step} by {envelope.sender})"
        jobs.add(envelope.job_id)
        by_aggregator = envelope.sender == AGGREGATOR
        if (envelope.step in AGGREGATOR_STEPS) != by_aggregator:
            verdict.problems.append(f"{where}: a {envelope.step} step by the wrong party")
        if allowed is not None and not by_aggregator and envelope.sender not in allowed:
            verdict.problems.append(f"{where}: {envelope.sender} is not a site of the job")
        unknown = [d[:12] for d in envelope.inputs if d not in made]
        if unknown:
            verdict.problems.append(
                f"{where}: starts from model(s) {unknown} that no earlier step made"
            )
        if envelope.step == "initial" and envelope.inputs:
            verdict.problems.append(f"{where}: the initial model has inputs")
        made.add(envelope.output)
        parents.setdefault(envelope.output, set()).update(envelope.inputs)
        envelopes.append(envelope)
        verdict.steps[envelope.step] = verdict.steps.get(envelope.step, 0) + 1
        if envelope.sender not in verdict.parties:
            verdict.parties.append(envelope.sender)
    if verifier is None and records:
        verdict.problems.append(
            f"{verdict.unsigned} record(s) could not be checked: no roster given (--roster), "
            "or the federation does not sign (provision it)"
        )
    if len(jobs) > 1:
        verdict.problems.append(f"records of several jobs: {sorted(jobs)}")
    _check_ends(envelopes, model, parents, verdict)
    return verdict


def _check_ends(
    envelopes: list[LineageEnvelope],
    model: str,
    parents: dict[str, set[str]],
    verdict: Verdict,
) -> None:
    initial = [e for e in envelopes if e.step == "initial"]
    final = [e for e in envelopes if e.step == "final"]
    if len(initial) != 1 or len(final) != 1:
        verdict.problems.append(
            f"a lineage has one initial and one final step; found {len(initial)} and {len(final)}"
        )
        return
    if envelopes[-1] is not final[0]:
        verdict.problems.append("steps were recorded after the final one")
    if final[0].output != model:
        verdict.problems.append(
            f"the final step's model {final[0].output[:12]}… is not the saved model "
            f"{model[:12]}…: the model file was replaced or altered"
        )
    # Back from the final model, every ancestor must lead to the initial one.
    seen: set[str] = set()
    frontier = [final[0].output]
    while frontier:
        digest = frontier.pop()
        if digest in seen:
            continue
        seen.add(digest)
        frontier.extend(parents.get(digest, ()))
    if initial[0].output not in seen:
        verdict.problems.append("the final model does not descend from the initial model")
