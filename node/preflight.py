"""``fedrelay preflight``: before a long job, is every site ready for it? A bad site is named,
with the fix.

Two levels:

- **At one site** (:func:`check_site`), where its node will run, before it starts, with that
  site's own credentials and data: it logs in; checks the rights the node needs (its queue
  exists and is readable, without taking a message; it may publish an event); reads its
  cases with the node's own code and summarises them (modalities, tumour regions and label
  values, voxel spacing, shapes); and looks at the device and the spool's free disk.
- **The whole federation** (:func:`check_federation`), as the aggregator, while the nodes
  run: a probe (``Command.PROBE``) to every site through the normal, signed outbox; each node
  answers with a ``preflight`` event carrying the same facts (:mod:`node.sitefacts`). A site
  that does not answer is named with what to run there; the answers are compared, and a site
  whose data differs from the others' (modalities, regions, spacing, shapes) is named.

Like ``job submit --wait``, the federation level reads the events queue, consuming what it
reads: run it before a job, not while someone follows one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from rich.markup import escape
from rich.table import Table

from node.algo import custom_factory
from node.config import FederationConfig, Site
from node.operate import federation_status
from node.process import site_cases
from node.sitefacts import (
    SPOOL_MODELS,
    Facts,
    default_model_bytes,
    device_facts,
    disk_facts,
    site_data_facts,
)
from relay.envelope import AGGREGATOR, EVENTS, Command, ControlEnvelope, EventEnvelope, to_wire
from relay.errors import AccessRefused, ConfigError, FedrelayError, InvalidInput, Unroutable
from relay.frame import decode_frame
from relay.jobspec import DEFAULT_CHUNK_SIZE, Algorithm
from relay.messaging import Outbox
from relay.security import Security
from relay.topology import Topology
from relay.transport import Transport
from relay.transport.amqp import AmqpTransport, BrokerSettings

Status = Literal["ok", "warn", "fail"]

EVENT = "preflight"
"""The event a site's answer (and a site's own preflight) is published as."""

LOGIN_ATTEMPTS = 2
"""Connection attempts before the broker counts as unreachable: preflight reports, it does
not wait out an outage as a node does."""

REGION_CODES = (
    "msd 1 oedema, 2 non-enhancing core, 3 enhancing; brats 2 oedema, 1 core, 4 enhancing"
)


@dataclass(frozen=True)
class Check:
    """One finding: about which site (or ``federation``), what was checked, how it went,
    what was seen, and what to do about it."""

    site: str
    check: str
    status: Status
    detail: str
    fix: str = ""


@dataclass
class Report:
    """Every check of one preflight, and what is known of each site."""

    federation: str
    scope: Literal["site", "federation"]
    checks: list[Check] = field(default_factory=list)
    sites: dict[str, dict[str, Any]] = field(default_factory=dict)
    probe: str | None = None

    @property
    def ok(self) -> bool:
        """True when no check failed (warnings allowed)."""
        return not any(c.status == "fail" for c in self.checks)

    def add(self, site: str, check: str, status: Status, detail: str, fix: str = "") -> None:
        """Record one finding."""
        self.checks.append(Check(site, check, status, detail, fix))

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (``--json``)."""
        return {
            "federation": self.federation,
            "scope": self.scope,
            "probe": self.probe,
            "ok": self.ok,
            "sites": self.sites,
            "checks": [asdict(c) for c in self.checks],
            "failed": [f"{c.site}: {c.check}" for c in self.checks if c.status == "fail"],
        }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if n >= 100 or unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _section(name: str) -> str:
    """The file's section of party ``name``."""
    return "aggregator" if name == AGGREGATOR else f"sites.{name}"


def _env(name: str) -> str:
    """The FEDRELAY_* variable that overrides party ``name``'s password."""
    return f"FEDRELAY_{_section(name).upper().replace('-', '_').replace('.', '__')}__PASSWORD"


# -- at one site --------------------------------------------------------------------------------


def _refused(
    config: FederationConfig, name: str, error: AccessRefused, source: Path
) -> tuple[str, str]:
    """Why the broker refused party ``name``'s login, and the fix."""
    broker, vhost = f"RabbitMQ at {config.broker.host}:{config.broker.port}", config.broker.vhost
    if "AccessDenied" in type(error.__cause__).__name__:  # logged in, but not to this vhost
        return (
            f"{broker} let user {name!r} log in but not use vhost {vhost!r}",
            f"the operator gives broker user {name!r} access to vhost {vhost!r}: import "
            "operator/definitions.json from `fedrelay provision`, or `rabbitmqctl "
            f"set_permissions -p {vhost} {name} '^$' <write> <read>`",
        )
    tls = config.broker.tls
    if tls is not None and tls.external_auth:
        return (
            f"credentials wrong: {broker} refused user {name!r}'s client certificate",
            f"use {name}'s own kit TLS files ([broker.tls] cert {tls.cert}, key {tls.key}, from "
            f"`fedrelay provision --tls`: common name {name!r}); the operator checks that broker "
            f"user {name!r} exists",
        )
    return (
        f"credentials wrong: {broker} refused user {name!r} with the password in "
        f"[{_section(name)}]",
        f"set password in [{_section(name)}] of {source} (or {_env(name)}) to broker user "
        f"{name!r}'s password from its kit; the operator can reset it with `rabbitmqctl "
        f"change_password {name} <new>`",
    )


@contextlib.contextmanager
def _quiet_pika() -> Iterator[None]:
    """pika logs a refused login as errors with a traceback; preflight reports it itself."""
    logger = logging.getLogger("pika")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _login(
    config: FederationConfig, name: str, settings: BrokerSettings, report: Report, source: Path
) -> AmqpTransport | None:
    where = f"{settings.host}:{settings.port} vhost {settings.vhost!r}"
    try:
        with _quiet_pika():
            transport = AmqpTransport(
                settings.model_copy(update={"reconnect_attempts": LOGIN_ATTEMPTS})
            )
    except AccessRefused as e:
        report.add(name, "login", "fail", *_refused(config, name, e, source))
        return None
    except ConfigError as e:
        report.add(name, "login", "fail", str(e), "use the TLS files of this party's kit")
        return None
    except FedrelayError as e:
        report.add(
            name,
            "login",
            "fail",
            f"broker unreachable: {e}",
            f"check [broker] host and port in {source}, that RabbitMQ runs there and that this "
            "machine may reach it (firewall; AMQPS listens on 5671)",
        )
        return None
    report.add(name, "login", "ok", f"logged in as {name!r} at {where}")
    return transport


def _rights(
    name: str,
    transport: AmqpTransport,
    topology: Topology,
    security: Security | None,
    report: Report,
) -> None:
    """The rights a node uses: its queue (exists, readable), and publishing events."""
    queue = topology.site_queue(name)
    topology_fix = (
        "the operator imports operator/definitions.json (`fedrelay provision`), or runs "
        "`fedrelay topology declare -c <the aggregator's file>`"
    )
    state = transport.queue_state(queue)
    if state is None:
        report.add(name, "queue", "fail", f"queue {queue} does not exist", topology_fix)
        return
    ready, consumers = state
    running = f"; {consumers} node(s) consuming it already" if consumers else ""
    report.add(name, "queue", "ok", f"{queue}: {ready} message(s) ready{running}")
    if ready and not consumers:
        report.add(
            name,
            "read",
            "warn",
            f"not checked: {ready} message(s) wait in {queue}, and a consumer attached now "
            "would take one; the node reads them when it starts",
        )
    else:
        try:
            transport.check_read(queue)
            report.add(name, "read", "ok", f"may read {queue}")
        except AccessRefused as e:
            report.add(
                name,
                "read",
                "fail",
                f"may not read its own queue: {e}",
                f"the operator grants {name!r} read on ^{re.escape(queue)}$ "
                "(operator/definitions.json from `fedrelay provision` does)",
            )
    outbox = Outbox(transport, topology, sender=name, security=security)
    try:
        outbox.send(
            EventEnvelope,
            chunk_size=DEFAULT_CHUNK_SIZE,
            job_id="-",
            recipient=EVENTS,
            event=EVENT,
            detail={"site": name, "level": "site"},
        )
    except AccessRefused as e:
        report.add(
            name,
            "publish",
            "fail",
            f"may not publish to {topology.exchange} as {name!r}: {e}",
            f"the operator grants {name!r} write on {topology.exchange} and topic rights for "
            "site.*, aggregator, events.* (operator/definitions.json does); with TLS, the "
            f"certificate's common name must be {name!r}",
        )
    except Unroutable as e:
        report.add(name, "publish", "fail", str(e), topology_fix)
    except FedrelayError as e:
        report.add(name, "publish", "fail", f"publishing failed: {e}")
    else:
        report.add(name, "publish", "ok", f"published a {EVENT} event to {topology.exchange}")


def _data_fix(message: str, name: str, source: Path) -> str:
    """What to do about an error reading a site's cases (the reader names the case)."""
    if "label values" in message:
        return (
            "relabel that case with the layout's values, remove it, or set kind in "
            f"[sites.{name}.data] to the layout the folder is in ({REGION_CODES})"
        )
    if "modality missing" in message or re.search(r"case \S+: no [\w, ]+ file", message):
        return "add the missing modality (FLAIR, T1, T1ce/T1gd, T2) or remove the case"
    if "shape" in message:
        return "re-export the case so that its modalities and label share one grid, or remove it"
    return f"point path and kind in [sites.{name}.data] of {source} at the site's case folder"


def _summary(facts: Mapping[str, Any]) -> str:
    if facts.get("data") == "trainer":
        return f"its own trainer {facts.get('trainer')} (finds its data itself: not checked)"
    labels = f", label values {facts['labels']}" if facts.get("labels") else ""
    shape = str(facts.get("shape_min"))
    if facts.get("shape_max") != facts.get("shape_min"):
        shape += f"..{facts.get('shape_max')}"
    return (
        f"{facts.get('cases')} {facts.get('data')} cases: {facts.get('modalities')} "
        f"modalities, regions {facts.get('regions')}{labels}, spacing {facts.get('spacing_mm')} "
        f"mm, shape {shape}"
    )


def _data(name: str, section: Site, report: Report, source: Path) -> Facts:
    if section.trainer is not None:
        try:
            custom_factory(
                section.trainer.factory,
                section.trainer.options,
                key=f"sites.{name}.trainer.factory",
            )
        except ConfigError as e:
            report.add(name, "data", "fail", str(e), "install the site's trainer package here")
            return {}
        facts = site_data_facts(section, None)
        _data_checks(name, facts, report)
        return facts
    try:
        cases = site_cases(section, name)
    except ConfigError as e:
        report.add(name, "data", "fail", str(e), _data_fix(str(e), name, source))
        return {}
    except Exception as e:  # the node fails the same way at start: report it, do not crash
        report.add(
            name,
            "data",
            "fail",
            f"reading the cases failed: {type(e).__name__}: {e}",
            _data_fix(str(e), name, source),
        )
        return {}
    facts = site_data_facts(section, cases)
    _data_checks(name, facts, report)
    return facts


def _data_checks(name: str, facts: Mapping[str, Any], report: Report) -> None:
    """One site's data on its own: readable, all regions present, one spacing."""
    if "error" in facts:
        report.add(name, "data", "fail", f"the node could not describe itself: {facts['error']}")
        return
    report.add(name, "data", "ok", _summary(facts))
    if facts.get("data") == "trainer":
        return
    regions = str(facts.get("regions") or "")
    if regions != "wt,tc,et":
        report.add(
            name,
            "labels",
            "warn",
            f"tumour regions found: {regions or 'none'} (of wt,tc,et), label values "
            f"{facts.get('labels')}",
            f"check the label coding ({REGION_CODES})",
        )
    if "," in str(facts.get("spacing_mm")):
        report.add(
            name,
            "spacing",
            "warn",
            f"cases differ in voxel spacing: {facts.get('spacing_mm')} mm",
            "resample the cases to one spacing (e.g. MONAI Spacingd) before training",
        )


def _device(name: str, facts: Mapping[str, Any], report: Report) -> None:
    gpu = f" ({facts['gpu']})" if facts.get("gpu") else ""
    threads = facts.get("torch_threads")
    report.add(name, "device", "ok", f"{facts.get('device')}{gpu}, {threads} torch threads")


def _disk(name: str, facts: Mapping[str, Any], sites: int, report: Report) -> None:
    free, need = facts.get("disk_free_bytes"), facts.get("disk_need_bytes")
    spool = facts.get("spool")
    if not facts.get("spool_writable", True):
        report.add(
            name,
            "spool",
            "fail",
            f"spool {spool} is not writable: {facts.get('spool_problem')}",
            f"make {spool} writable by the node's user (systemd: ReadWritePaths)",
        )
    if not isinstance(free, int) or not isinstance(need, int):
        return
    model = _size(default_model_bytes())
    basis = (
        f"a job with the default model ({model}) needs about {_size(need)}: an ensemble of "
        f"{sites} plus {SPOOL_MODELS} model copies, and a margin"
    )
    if free < need:
        report.add(
            name,
            "disk",
            "fail",
            f"{_size(free)} free at spool {spool}; {basis}",
            "free space there, or move the spool (spool in the site's section) to a larger "
            "filesystem; a larger model needs proportionally more",
        )
    else:
        report.add(name, "disk", "ok", f"{_size(free)} free at spool {spool}; {basis}")


def check_site(config: FederationConfig, name: str, *, source: Path) -> Report:
    """Preflight at site ``name``, before its node starts: broker login and rights with its
    own credentials, its cases, device and disk (``source`` is the file, for the fixes)."""
    report = Report(config.federation, "site")
    try:
        section = config.site(name)
    except ConfigError as e:
        report.add(name, "config", "fail", str(e), f"add [sites.{name}] to {source}")
        return report
    security: Security | None = None
    keys: tuple[Status, str, str]
    try:
        security = config.party_security(name)
        keys = (
            ("ok", f"envelopes signed with {name}'s key, verified against the roster", "")
            if security is not None
            else (
                "warn",
                "no [security]: envelopes are neither signed nor verified",
                "run `fedrelay provision` and use the kit it writes",
            )
        )
    except ConfigError as e:
        keys = ("fail", str(e), "use the keys and roster of this site's kit")
    try:
        settings = config.broker_settings(name, section.password)
    except ConfigError as e:
        report.add(name, "login", "fail", str(e), f"set password in [{_section(name)}] of {source}")
    else:
        transport = _login(config, name, settings, report, source)
        if transport is not None:
            try:
                _rights(name, transport, config.topology(), security, report)
            except FedrelayError as e:
                report.add(name, "rights", "fail", f"checking the broker rights failed: {e}")
            finally:
                transport.close()
    report.add(name, "keys", *keys)
    facts = {"site": name, **_data(name, section, report, source), **device_facts()}
    facts |= disk_facts(section.spool, sites=len(config.sites))
    _device(name, facts, report)
    _disk(name, facts, len(config.sites), report)
    report.sites[name] = {"facts": facts}
    return report


# -- the whole federation -----------------------------------------------------------------------


def probe_id() -> str:
    """A fresh probe's job id."""
    return f"preflight-{uuid.uuid4().hex[:12]}"


def collect_answers(
    transport: Transport,
    topology: Topology,
    probe: str,
    sites: set[str],
    *,
    timeout_s: float,
    security: Security | None,
) -> dict[str, tuple[Facts, float]]:
    """The sites' answers to ``probe``: facts and seconds after the start, by site, read from
    the events queue until every site answered or ``timeout_s`` passed. Only an answer whose
    sender is the broker user that published it, and, with ``security``, whose signature
    verifies, is taken; everything read is consumed."""
    answers: dict[str, tuple[Facts, float]] = {}
    started = time.monotonic()
    deadline = started + timeout_s
    while set(answers) != sites:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        delivery = transport.get(topology.events_queue, timeout=min(left, 1.0))
        if delivery is None:
            continue
        transport.ack(delivery)
        try:
            envelope, _ = decode_frame(delivery.message.body)
            if envelope.sender != delivery.message.user_id:
                continue
            if security is not None:
                security.verify(to_wire(envelope), envelope.sender)
        except InvalidInput:
            continue
        if (
            isinstance(envelope, EventEnvelope)
            and envelope.event == EVENT
            and envelope.job_id == probe
            and envelope.sender in sites
        ):
            answers[envelope.sender] = (dict(envelope.detail), time.monotonic() - started)
    return answers


def _queues(
    config: FederationConfig, user: str, password: str, report: Report
) -> dict[str, tuple[int, int]] | None:
    """Each site's (ready messages, consumers), from the management API; None if it failed."""
    try:
        status = federation_status(config, user=user, password=password)
    except FedrelayError as e:
        report.add(
            "federation",
            "management",
            "warn",
            f"cannot tell which sites' queues have a consumer: {e}",
            "pass --user/--password of a user with the monitoring tag "
            "(operator/credentials.toml from `fedrelay provision`)",
        )
        return None
    topology = config.topology()
    by_queue = {q["name"]: (int(q["ready"]), int(q["consumers"])) for q in status["queues"]}
    return {site: by_queue.get(topology.site_queue(site), (0, 0)) for site in topology.sites}


def _silent(site: str, queue: tuple[int, int] | None, timeout_s: float, report: Report) -> None:
    """A site that did not answer: what its queue said before the probe, and what to run
    there."""
    there = (
        f"run `fedrelay preflight -c <its file> --site {site}` there, and check "
        f"`journalctl -u fedrelay-node@{site}`"
    )
    waiting = f"; {queue[0]} message(s) waited in it before the probe" if queue and queue[0] else ""
    if queue is not None and queue[1] > 0:
        report.add(
            site,
            "reachable",
            "fail",
            f"a node consumes its queue but did not answer within {timeout_s:g} s{waiting}",
            f"it may be busy with a long message, or run a fedrelay without probes; {there}",
        )
        return
    seen = "no node consuming its queue" if queue is not None else "no answer"
    report.add(
        site,
        "reachable",
        "fail",
        f"{seen} within {timeout_s:g} s: not running, or it could not log in (a node "
        f"training a long hop detaches from its queue, and answers after){waiting}",
        there,
    )


def _groups(values: Mapping[str, str]) -> list[tuple[str, list[str]]]:
    by_value: dict[str, list[str]] = {}
    for site, value in values.items():
        by_value.setdefault(value, []).append(site)
    return sorted(by_value.items(), key=lambda item: -len(item[1]))


Fix = Callable[[str, str | None], str]
"""What to do, given the odd site (or ``federation``) and the others' common value, if any."""


def _differ(
    report: Report, check: str, values: Mapping[str, str], *, what: str, status: Status, fix: Fix
) -> None:
    """Flag the sites whose ``values`` differ from the others', by name."""
    groups = _groups(values)
    if len(groups) <= 1:
        if groups:
            report.add("federation", check, "ok", f"every site: {what} {groups[0][0]}")
        return
    (common, members), (_, runner_up) = groups[0], groups[1]
    if len(members) > len(runner_up):
        for value, sites in groups[1:]:
            for site in sites:
                detail = f"{site}: {what} {value}, others ({', '.join(members)}) {common}"
                report.add(site, check, status, detail, fix(site, common))
        return
    listed = "; ".join(f"{', '.join(sites)} {value}" for value, sites in groups)
    report.add("federation", check, status, f"{what} differs: {listed}", fix("federation", None))


def compare(report: Report, facts: Mapping[str, Mapping[str, Any]]) -> None:
    """Flag, by name, sites whose data differs from the others': modalities and tumour
    regions (failures: the model cannot learn them together), voxel spacing and volume
    shapes (warnings: resample, or train on patches)."""
    described = {s: f for s, f in facts.items() if f.get("data") not in (None, "trainer")}
    if len(described) < 2:
        return
    _differ(
        report,
        "modalities",
        {s: str(f.get("modalities")) for s, f in described.items()},
        what="modalities",
        status="fail",
        fix=lambda site, _: (
            f"give {site} the 4 modalities of Task01 (FLAIR, T1w, T1gd, T2w), in that order"
        ),
    )
    _differ(
        report,
        "labels",
        {s: str(f.get("regions")) for s, f in described.items()},
        what="tumour regions",
        status="fail",
        fix=lambda site, _: f"check {site}'s label coding ({REGION_CODES}) and data.kind",
    )
    _differ(
        report,
        "spacing",
        {s: f"{f.get('spacing_mm')} mm" for s, f in described.items()},
        what="spacing",
        status="warn",
        fix=lambda site, common: (
            f"resample {site}'s cases to {common} (e.g. MONAI Spacingd) before training"
            if common
            else "resample every site's cases to one spacing (e.g. MONAI Spacingd)"
        ),
    )
    shapes = {
        s: str(f.get("shape_min"))
        + ("" if f.get("shape_max") == f.get("shape_min") else f"..{f.get('shape_max')}")
        for s, f in described.items()
    }
    _differ(
        report,
        "shape",
        shapes,
        what="volume shape (cropped to the brain)",
        status="warn",
        fix=lambda _site, _common: (
            "train with --patch-size (e.g. 96): whole volumes must share one shape"
        ),
    )


def check_federation(
    config: FederationConfig, *, source: Path, timeout_s: float, user: str, password: str
) -> Report:
    """Preflight of the whole federation, as the aggregator: probe every site's running node,
    wait up to ``timeout_s`` for the answers, say which queues have a consumer (management
    API as ``user``), and compare the sites' data."""
    report = Report(config.federation, "federation", probe=probe_id())
    assert report.probe is not None
    topology = config.topology()
    try:
        section = config.aggregator_section()
        settings = config.broker_settings(AGGREGATOR, section.password)
        security = config.party_security(AGGREGATOR)
    except ConfigError as e:
        report.add(AGGREGATOR, "config", "fail", str(e), f"use the aggregator's file, not {source}")
        return report
    transport = _login(config, AGGREGATOR, settings, report, source)
    if transport is None:
        return report
    queues = _queues(config, user, password, report)
    try:
        outbox = Outbox(transport, topology, sender=AGGREGATOR, security=security)
        probed: set[str] = set()
        for site in topology.sites:
            try:
                outbox.send(
                    ControlEnvelope,
                    chunk_size=DEFAULT_CHUNK_SIZE,
                    job_id=report.probe,
                    algorithm=Algorithm.FEDAVG,  # required of every control message; unused
                    recipient=site,
                    command=Command.PROBE,
                    reason="fedrelay preflight",
                )
                probed.add(site)
            except FedrelayError as e:
                report.add(site, "reachable", "fail", f"cannot send it a probe: {e}")
        answers = collect_answers(
            transport, topology, report.probe, probed, timeout_s=timeout_s, security=security
        )
    except FedrelayError as e:
        report.add(AGGREGATOR, "probe", "fail", f"probing the sites failed: {e}")
        return report
    finally:
        transport.close()
    facts: dict[str, Facts] = {}
    for site in topology.sites:
        queue = None if queues is None else queues[site]
        entry: dict[str, Any] = {
            "reachable": site in answers,
            "consumers": None if queue is None else queue[1],
            "answered_s": None,
            "facts": None,
        }
        report.sites[site] = entry
        if site not in answers:
            if site in probed:
                _silent(site, queue, timeout_s, report)
            continue
        facts[site], seconds = answers[site]
        entry.update(answered_s=round(seconds, 3), facts=facts[site])
        report.add(site, "reachable", "ok", f"its node answered in {seconds:.1f} s")
        _data_checks(site, facts[site], report)
        if "device" in facts[site]:
            _device(site, facts[site], report)
        _disk(site, facts[site], len(topology.sites), report)
    compare(report, facts)
    return report


# -- output -----------------------------------------------------------------------------------

STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def table(report: Report) -> Table:
    """The report as a table, one row per check."""
    scope = "site" if report.scope == "site" else "federation (probe " + str(report.probe) + ")"
    title = f"preflight of {report.federation}: {scope}"
    grid = Table(title=title, show_lines=True)
    for column in ("site", "check", "status", "detail", "fix"):
        grid.add_column(column, overflow="fold")
    for c in report.checks:
        status = f"[{STYLE[c.status]}]{c.status}"
        grid.add_row(escape(c.site), c.check, status, escape(c.detail), escape(c.fix))
    return grid
