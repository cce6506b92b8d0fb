"""The ``fedrelay`` command line."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from node.config import FederationConfig
from node.config import load as load_config
from node.options import JobOptions, SimulationConfig
from relay.envelope import AGGREGATOR, Command, Envelope, MetricsEnvelope
from relay.errors import ConfigError, FedrelayError
from relay.jobspec import AbsentSite, Aggregation, Algorithm
from relay.validation import describe

# Torch, MONAI and matplotlib take seconds to import: each command imports what it uses, so
# that `fedrelay job cancel` or `status` answers at once.
if TYPE_CHECKING:
    from node.report import Context as ReportContext
    from node.simulate import SimulationResult
    from node.watch import Jobs, JobView, ReadStream
    from relay.endpoint import Endpoint
    from relay.transport import Message
    from relay.transport.amqp import AmqpTransport

F = TypeVar("F", bound=Callable[..., Any])
Opts = TypeVar("Opts", bound=JobOptions)

COLUMNS = (("dice_wt", "WT"), ("dice_tc", "TC"), ("dice_et", "ET"), ("dice_mean", "mean"))


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """fedrelay: federated learning where models travel and images stay home."""
    level = logging.WARNING - 10 * min(verbose, 2)
    # force: a dependency (opacus) configures the root logger when imported, which would
    # make this call a no-op and -v ineffective.
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )


def _training_steps(config: SimulationConfig) -> int:
    return config.job().rounds * config.sites


def _option(name: str, help: str, **kwargs: Any) -> Callable[[F], F]:
    """An option whose default comes from SimulationConfig (and so JobOptions): never drifts."""
    field = kwargs.pop("field", name.removeprefix("--").replace("-", "_"))
    default = SimulationConfig.model_fields[field].default
    if isinstance(default, Enum):
        default = default.value
    if "type" not in kwargs:
        kwargs["type"] = type(default)
    return click.option(
        name, field, default=default, show_default=default is not None, help=help, **kwargs
    )


def _job_options(command: F) -> F:
    """The options ``simulate`` and ``job submit`` share (all but ``--algorithm``)."""
    options = [
        _option(
            "--rounds",
            "FedAvg rounds, CWT cycles, or ensemble training passes  [default: 10; 1 for swt]",
            type=int,
        ),
        _option("--local-epochs", "Epochs a site trains per round or ring visit."),
        _option("--seed", "Fixes the data, the initial model and the training order."),
        _option(
            "--model", "Network from the node's registry.", type=click.Choice(["unet", "segresnet"])
        ),
        _option("--width", "Channels of the network's first level."),
        _option("--depth", "Resolution levels of the network."),
        _option("--batch-size", "Cases per training step."),
        _option("--learning-rate", "Adam's learning rate at each site."),
        _option(
            "--min-sites",
            "FedAvg quorum once a round's deadline passes  [default: every site]",
            type=int,
        ),
        _option(
            "--round-timeout", "Seconds a round waits for site updates.", field="round_timeout_s"
        ),
        _option("--chunk-size", "Payloads larger than this many bytes travel as chunks."),
        _option(
            "--server-momentum",
            "FedAvg: momentum on each round's average change of the model (FedAvgM, e.g. 0.9).",
        ),
        _option(
            "--aggregation",
            "FedAvg: mean (weighted by cases), or median / trimmed-mean, robust to faulty or "
            "hostile sites (unweighted).",
            type=click.Choice([a.value for a in Aggregation]),
        ),
        _option("--trim-fraction", "trimmed-mean: fraction of sites' values dropped at each end."),
        _option(
            "--max-update-norm",
            "FedAvg: clip each site's update (its change of the model) to this L2 norm  "
            "[default: no clipping]",
            type=float,
        ),
        _option(
            "--ring-gate",
            "SWT/CWT: a site refuses a model whose mean Dice on its validation cases is more "
            "than this below the model its sender was sent, and trains that one instead  "
            "[default: off]",
            type=float,
        ),
        _option(
            "--absent-site",
            "SWT/CWT: when the next site does not take the token within --hop-timeout: wait "
            "for it, skip it, or skip it and revisit it at the end of the cycle.",
            type=click.Choice([a.value for a in AbsentSite]),
        ),
        _option(
            "--hop-timeout",
            "SWT/CWT with --absent-site skip or revisit: seconds the next site has to take "
            "the token.",
            field="hop_timeout_s",
            type=float,
        ),
        _option(
            "--dp-clip-norm",
            "Differential privacy: clip each model a site sends to this L2 norm of its "
            "update  [default: off]",
            type=float,
        ),
        _option(
            "--dp-noise-multiplier",
            "Differential privacy: Gaussian noise std in units of --dp-clip-norm; larger "
            "noise, smaller ε  [default: off]",
            type=float,
        ),
        _option("--dp-delta", "Differential privacy: the δ that ε is reported at."),
        _option(
            "--patch-size",
            "Train on random crops of this many voxels a side and evaluate by sliding window "
            "(for sites' own cases, which differ in size)  [default: whole volumes]",
            type=int,
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def _validated(schema: type[Opts], options: dict[str, Any]) -> Opts:
    """Options checked by ``schema``; a usage error names each bad option as typed."""
    try:
        return schema.model_validate(options)
    except ValidationError as e:
        message = describe(e, what="option")
        message = re.sub(r"option\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), message)
        raise click.UsageError(message) from e


ALGORITHMS = click.Choice([a.value for a in Algorithm])


@main.command("simulate")
@_option("--algorithm", "How the model travels.", type=ALGORITHMS)
@_option("--sites", "Number of sites (site-1, site-2, ...), each with its own data.")
@_job_options
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("runs/simulate"),
    show_default=True,
    help="Folder for results.json and model.safetensors.",
)
@_option("--volume-size", "Phantom volumes are this many voxels per side.")
@_option("--cases-per-site", "Phantom cases per site, on average.")
@_option(
    "--case-split",
    "How cases are shared: even (±20% per site) or brats (the BraTS institutions' "
    "70:27:17:12:11:9:6:6:4:3).",
    type=click.Choice(["even", "brats"]),
)
@_option(
    "--heterogeneity",
    "How far the sites' scanners (contrast, bias field, noise) and lesion sizes differ: "
    "0 alike, 1 the widest spread.",
)
@click.option(
    "--baselines",
    is_flag=True,
    help="Also train centralized (all sites' cases pooled) and local-only models on the same "
    "data with the same budget, for reference.",
)
@click.option(
    "--encrypt-payloads",
    is_flag=True,
    help="Encrypt every payload end to end for its recipient (envelopes are always signed).",
)
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of a table.")
def simulate_command(output: Path, as_json: bool, **options: object) -> None:
    """Simulate a federation in this process, on generated brain-tumour data."""
    from node.simulate import simulate

    config = _validated(SimulationConfig, options)
    console = Console(stderr=True)
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(),
        console=console,
        disable=as_json,
    ) as progress:
        task = progress.add_task(
            f"{config.algorithm} · {config.sites} sites", total=_training_steps(config), last=""
        )

        def on_event(envelope: Envelope) -> None:
            if isinstance(envelope, MetricsEnvelope) and envelope.stage == "trained":
                dice = envelope.metrics.get("dice_mean", 0.0)
                progress.update(
                    task,
                    advance=1,
                    last=f"{envelope.sender} r{envelope.round} h{envelope.hop} dice {dice:.3f}",
                )

        try:
            result = simulate(config, output, on_event=on_event)
        except FedrelayError as e:
            raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(result.model_dump_json(indent=2))
    else:
        _print_table(result, output, Console())
    if result.status != "done":
        raise click.ClickException(f"the job did not complete: {result.reason}")


def _print_baselines(result: SimulationResult, console: Console) -> None:
    table = Table(title="All sites' validation cases: the federated model and its references")
    table.add_column("method")
    for _, region in COLUMNS:
        table.add_column(region, justify="right")
    table.add_column("% of centralized", justify="right")
    central = result.baselines["centralized"].final_overall.get("dice_mean", 0.0)
    local = result.baselines["local"]
    rows = [
        (f"{result.job.algorithm} (federated)", result.final_overall),
        ("centralized", result.baselines["centralized"].final_overall),
        ("local only, each site's own model", local.final_overall),
        (f"best single local model ({local.best_single})", local.best_single_overall or {}),
    ]
    for name, overall in rows:
        share = overall.get("dice_mean", 0.0) / central if central else 0.0
        table.add_row(name, *(f"{overall.get(key, 0.0):.3f}" for key, _ in COLUMNS), f"{share:.0%}")
    console.print(table)


def _print_table(result: SimulationResult, output: Path, console: Console) -> None:
    from node.results import MODEL_FILE
    from node.simulate import RESULTS_FILE

    algorithm = result.job.algorithm
    final = "ensemble" if algorithm is Algorithm.ENSEMBLE else "global model"
    table = Table(title=f"Dice on each site's validation cases: {algorithm}, {final}")
    table.add_column("site")
    table.add_column("val cases", justify="right")
    for _, region in COLUMNS:
        table.add_column(region, justify="right")
    table.add_column("untrained mean", justify="right")
    for site, metrics in result.final.items():
        table.add_row(
            site,
            str(result.data[site].validation_cases),
            *(f"{metrics.get(key, 0.0):.3f}" for key, _ in COLUMNS),
            f"{result.initial[site]['dice_mean']:.3f}",
        )
    overall = result.final_overall
    table.add_row(
        "[bold]all sites",
        str(sum(d.validation_cases for d in result.data.values())),
        *(f"[bold]{overall.get(key, 0.0):.3f}" for key, _ in COLUMNS),
        f"{result.initial_overall.get('dice_mean', 0.0):.3f}",
        end_section=True,
    )
    console.print(table)
    if result.baselines:
        _print_baselines(result, console)
    moved = result.bytes_moved.total_bytes / 1e6
    console.print(
        f"{result.status} in {result.wall_time_s:.1f} s, {moved:.1f} MB moved. "
        f"Results: {output / RESULTS_FILE}; model: {output / MODEL_FILE}"
    )
    if result.dead_letters:
        console.print(
            f"[yellow]{len(result.dead_letters)} message(s) dead-lettered:[/] "
            + "; ".join(result.dead_letters[:3])
        )


# -- deployment: one process per party, over RabbitMQ -----------------------------------------

config_option = click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    envvar="FEDRELAY_CONFIG",
    help="The federation file (TOML).",
)


def _load(config_path: Path) -> FederationConfig:
    try:
        return load_config(config_path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from e


def _serve(make: Callable[[FederationConfig], Endpoint], config_path: Path) -> None:
    from node.process import serve, stop_on_signals

    config = _load(config_path)
    stop = stop_on_signals()
    try:
        serve(make(config), stop)
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e


@main.group()
def topology() -> None:
    """The federation's exchanges and queues on RabbitMQ."""


@topology.command("declare")
@config_option
def topology_declare(config_path: Path) -> None:
    """Declare the exchanges, quorum queues and bindings (as the aggregator; idempotent)."""
    from relay.transport.amqp import AmqpTransport

    config = _load(config_path)
    section = config.aggregator_section()
    try:
        transport = AmqpTransport(config.broker_settings(AGGREGATOR, section.password))
        transport.declare(config.topology())
        transport.close()
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"declared federation {config.federation!r} on vhost {config.broker.vhost!r}")


as_party_option = click.option(
    "--as",
    "party",
    default=AGGREGATOR,
    show_default=True,
    help="Read the events log as this party of the file (it needs the log's read right: "
    "provisioned kits give it to the aggregator).",
)


@main.command("report")
@click.argument("results", type=click.Path(path_type=Path, exists=True))
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="A deployed job's federation file: adds the per-round Dice, time per hop and "
    "privacy spent from the federation's events log.",
)
@as_party_option
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for report.md and its PNGs  [default: report/ beside the results]",
)
def report_command(
    results: Path, config_path: Path | None, party: str, output: Path | None
) -> None:
    """Write a markdown report with plots from a simulation's results.json, or a deployed
    job's folder (<the aggregator's output>/<job id>) or its job.json."""
    from node.jobreport import job_file
    from node.report import load_results, write_report

    try:
        file = job_file(results)
        if file is None:
            if config_path is not None:
                click.echo("-c ignored: a simulation's results.json holds its history", err=True)
            result, context = load_results(results), None
        else:
            result, context = _deployed_result(file, config_path, party)
        folder = output or (results if results.is_dir() else results.parent) / "report"
        click.echo(write_report(result, folder, context=context))
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e


def _deployed_result(
    file: Path, config_path: Path | None, party: str
) -> tuple[SimulationResult, ReportContext]:
    """A deployed job's results, with its events if ``config_path`` is given and its events
    log can be read (if not, a warning, and the report says so)."""
    from node.jobreport import job_result, load_job, read_job_events

    record = load_job(file)
    if config_path is None:
        return job_result(record, None, source=str(file))
    config = _load(config_path)
    if record.job.federation != config.federation:
        raise ConfigError(
            f"{file}: job {record.job.job_id} ran in federation {record.job.federation!r}, "
            f"but {config_path} is federation {config.federation!r}'s file; give its own"
        )
    log_queue = config.topology().log_queue
    source = f"{file} and the events log {log_queue} (read as {party!r})"
    try:
        read, jobs, transport = _events_reader(config, party)
        try:
            events = read_job_events(read, record.job.job_id, security=jobs.security)
        finally:
            transport.close()
    except FedrelayError as e:
        unread = f"the events log {log_queue} could not be read as {party!r}: {e}"
        click.echo(f"warning: {unread}; the report has no per-round curves", err=True)
        return job_result(record, None, source=str(file), unread=unread)
    return job_result(record, events, source=source)


@main.group("lineage")
def lineage_group() -> None:
    """A final model's signed history."""


@lineage_group.command("verify")
@click.argument("model", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--roster",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="The federation's roster.json  [default: the one beside the model (simulations)]",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lineage_verify(model: Path, roster: Path | None, as_json: bool) -> None:
    """Check a model's lineage offline: every step signed by its party, every step starting
    from a model an earlier step made, the saved model the last step's. Exit 1 if not."""
    from node.audit import audit, find_roster
    from relay.security import Roster

    try:
        roster_path = roster or find_roster(model)
        verdict, spec = audit(model, Roster.load(roster_path) if roster_path else None)
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    if as_json:
        click.echo(json.dumps(asdict(verdict) | {"ok": verdict.ok, "job_id": spec.job_id}))
    else:
        steps = ", ".join(f"{n} {step}" for step, n in verdict.steps.items())
        click.echo(
            f"job {spec.job_id} ({spec.algorithm}): {verdict.records} records ({steps}) by "
            f"{', '.join(verdict.parties)}"
        )
        for problem in verdict.problems:
            click.echo(f"  - {problem}")
        click.echo("lineage verified" if verdict.ok else "lineage NOT verified")
    if not verdict.ok:
        sys.exit(1)


@main.command("provision")
@click.argument("federation_file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="An empty folder for the kits (one per party, and operator/).",
)
@click.option(
    "--tls/--no-tls",
    default=True,
    show_default=True,
    help="A federation CA, a TLS-only broker listener, and login by client certificate; "
    "--no-tls gives parties passwords over plain AMQP instead.",
)
@click.option(
    "--broker-name",
    "broker_names",
    multiple=True,
    help="Host name or IP in the broker's certificate (repeatable)  [default: the file's host]",
)
@click.option("--encrypt-payloads", is_flag=True, help="Encrypt every payload end to end.")
def provision_command(
    federation_file: Path,
    output: Path,
    tls: bool,
    broker_names: tuple[str, ...],
    encrypt_payloads: bool,
) -> None:
    """Write startup kits: keys, roster, broker users and rights, TLS certificates."""
    from node.provision import OPERATOR, provision

    config = _load(federation_file)
    try:
        kits = provision(
            config,
            output,
            tls=tls,
            encrypt_payloads=encrypt_payloads,
            broker_names=broker_names,
        )
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    for kit in kits:
        click.echo(f"{kit.name}: {kit}/ (hand it to {kit.name} only; it holds private keys)")
    operator = output / OPERATOR
    click.echo(
        f"operator: {operator}/ — import {operator / 'definitions.json'} into RabbitMQ (see "
        f"{operator / 'rabbitmq.conf'}); monitoring login in {operator / 'credentials.toml'}"
    )


@main.group()
def node() -> None:
    """A site's node."""


@node.command("run")
@config_option
@click.option("--site", required=True, envvar="FEDRELAY_SITE", help="This site's name.")
def node_run(config_path: Path, site: str) -> None:
    """Serve one site until SIGTERM/SIGINT: receive, persist, ack, train, send."""
    from node.process import site_node

    _serve(lambda config: site_node(config, site), config_path)


@main.group("aggregator")
def aggregator_group() -> None:
    """The aggregator (coordinator) process."""


@aggregator_group.command("run")
@config_option
def aggregator_run(config_path: Path) -> None:
    """Serve the aggregator until SIGTERM/SIGINT; finished jobs go to its output folder."""
    from node.process import aggregator

    _serve(aggregator, config_path)


@main.group()
def job() -> None:
    """Jobs of a running federation."""


@job.command("submit")
@config_option
@click.option("--algorithm", type=ALGORITHMS, required=True, help="How the model travels.")
@_job_options
@click.option("--job-id", default=None, help="[default: a new uuid]")
@click.option("--wait", is_flag=True, help="Follow the events until the job ends.")
def job_submit(config_path: Path, wait: bool, job_id: str | None, **options: Any) -> None:
    """Submit a job to the aggregator; prints its id (sites run in ring order of the file)."""
    from node.models import initial_weights
    from node.operate import submit_job, wait_for_job
    from relay.transport.amqp import AmqpTransport

    config = _load(config_path)
    job_options = _validated(JobOptions, options)
    try:
        spec = job_options.job(
            federation=config.federation, sites=list(config.sites), job_id=job_id
        )
    except ValidationError as e:
        raise click.UsageError(describe(e, what="job")) from e
    try:
        transport = AmqpTransport(
            config.broker_settings(AGGREGATOR, config.aggregator_section().password)
        )
        security = config.party_security(AGGREGATOR)
        submit_job(
            transport,
            config.topology(),
            spec,
            initial_weights(spec.model, seed=spec.seed),
            security=security,
        )
        click.echo(spec.job_id)
        if wait:
            ended = wait_for_job(transport, config.topology(), spec.job_id, security=security)
            transport.close()
            click.echo(f"{ended.command}{': ' + ended.reason if ended.reason else ''}")
            if ended.command is not Command.JOB_DONE:
                sys.exit(1)
        else:
            transport.close()
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e


def management_options(user_help: str) -> Callable[[F], F]:
    """``--user`` and ``--password`` of the management API (a monitoring user)."""
    user = click.option("--user", default="guest", show_default=True, help=user_help)
    password = click.option(
        "--password", default="guest", envvar="FEDRELAY_MONITOR_PASSWORD", show_default=True
    )

    def apply(command: F) -> F:
        return user(password(command))

    return apply


def _events_reader(config: FederationConfig, party: str) -> tuple[ReadStream, Jobs, AmqpTransport]:
    """A reader of the federation's events log, logged in as ``party``, and an empty fold."""
    from node.watch import Jobs
    from relay.transport.amqp import AmqpTransport

    transport = AmqpTransport(config.party_settings(party))
    queue = config.topology().log_queue

    def read(
        on_message: Callable[[Message, int], bool], offset: str | int, idle_s: float | None
    ) -> str | int:
        return transport.read_stream(queue, on_message, offset=offset, idle_s=idle_s)

    return read, Jobs(security=config.party_security(party)), transport


def _site_line(view: JobView, site: str) -> str:
    from node.watch import SiteView

    part = view.per_site.get(site) or SiteView()
    where = "" if part.round is None else f"r{part.round} h{part.hop}"
    dice = "" if part.dice_mean is None else f"dice {part.dice_mean:.3f}"
    return " ".join(x for x in (part.stage, where, dice) if x)


def _job_line(view: JobView) -> str:
    if view.algorithm in (Algorithm.SWT, Algorithm.CWT):
        where = f"cycle {view.round + 1}/{view.rounds}, hop {view.hop}"
    else:
        where = f"round {view.round + 1}/{view.rounds}"
    dice = "" if view.dice_mean is None else f", final mean Dice {view.dice_mean:.3f}"
    trouble = (
        f", {view.rejected} rejected, {view.errors} errors" if view.rejected + view.errors else ""
    )
    return f"job {view.job_id} ({view.algorithm}): {view.status}, {where}{dice}{trouble}"


def _job_command(config_path: Path, job_id: str, command: Command, reason: str, wait: bool) -> None:
    from node.operate import send_command, wait_for_job
    from relay.transport.amqp import AmqpTransport

    config = _load(config_path)
    try:
        transport = AmqpTransport(config.party_settings(AGGREGATOR))
        security = config.party_security(AGGREGATOR)
        try:
            request = send_command(
                transport, config.topology(), job_id, command, reason=reason, security=security
            )
            click.echo(f"{command} sent for job {job_id}")
            ended = (
                wait_for_job(
                    transport, config.topology(), job_id, security=security, request=request
                )
                if wait
                else None
            )
        finally:
            transport.close()
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    if ended is not None:
        click.echo(f"{ended.command}{': ' + ended.reason if ended.reason else ''}")
        if ended.command is not Command.JOB_DONE:
            sys.exit(1)


reason_option = click.option("--reason", default="", help="Why, for the record and the sites.")


@job.command("cancel")
@config_option
@click.argument("job_id")
@reason_option
def job_cancel(config_path: Path, job_id: str, reason: str) -> None:
    """Stop a running job: it ends as cancelled, and its state is kept to resume it."""
    _job_command(config_path, job_id, Command.CANCEL, reason, wait=False)


@job.command("resume")
@config_option
@click.argument("job_id")
@reason_option
@click.option("--wait", is_flag=True, help="Follow the events until the job ends.")
def job_resume(config_path: Path, job_id: str, reason: str, wait: bool) -> None:
    """Run a failed or cancelled FedAvg or ensemble job on from the round it stopped in."""
    _job_command(config_path, job_id, Command.RESUME, reason, wait)


@main.command("watch")
@config_option
@click.option("--job", "job_id", default=None, help="[default: the running job, or else the next]")
@as_party_option
@click.option("--json", "as_json", is_flag=True, help="One JSON line per event: the job's view.")
@click.option(
    "--idle-timeout",
    type=float,
    default=None,
    help="Give up after this many seconds without an event  [default: never]",
)
def watch_command(
    config_path: Path, job_id: str | None, party: str, as_json: bool, idle_timeout: float | None
) -> None:
    """Follow a job live: a progress bar per site, the round or hop, the latest Dice.

    Exits when the job ends: 0 if it is done, 1 if it failed or was cancelled.
    """
    from node.watch import follow

    config = _load(config_path)
    console = Console(stderr=True)
    try:
        read, jobs, transport = _events_reader(config, party)
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[last]}"),
        console=console,
        disable=as_json,
    ) as progress:
        tasks: dict[str, TaskID] = {}

        def changed(what: str, view: JobView) -> None:
            if as_json:
                click.echo(json.dumps({"event": what} | view.as_dict()))
                return
            if "job" not in tasks:
                tasks["job"] = progress.add_task("job", total=None, last="")
            progress.update(tasks["job"], last=_job_line(view))
            for site in view.sites:
                if site not in tasks:
                    tasks[site] = progress.add_task(site, total=view.steps, last="")
                done = view.per_site[site].trained if site in view.per_site else 0
                progress.update(tasks[site], completed=done, last=_site_line(view, site))

        try:
            view = follow(read, jobs, job_id, changed, idle_timeout_s=idle_timeout)
        except FedrelayError as e:
            raise click.ClickException(str(e)) from e
        finally:
            transport.close()
    if view is None:
        what = f"job {job_id} is not" if job_id else "no job is"
        raise click.ClickException(
            f"{what} in the events log; submit one with `fedrelay job submit`, or check --job"
        )
    if not as_json:
        Console().print(_job_line(view))
    if not view.finished:
        raise click.ClickException(
            f"no event for {idle_timeout:g} s; the job is still {view.status}"
        )
    if view.status != "done":
        raise click.ClickException(f"job {view.job_id} {view.status}: {view.reason}")


@main.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@management_options("Management API user (needs the monitoring tag).")
@as_party_option
@click.option("--jobs", "job_count", default=3, show_default=True, help="Newest jobs to show.")
def status_command(
    *, config_path: Path, as_json: bool, user: str, password: str, party: str, job_count: int
) -> None:
    """One screen: queues, sites online, dead letters, and the newest jobs' state."""
    from node.operate import federation_status
    from node.watch import snapshot as snapshot_events

    config = _load(config_path)
    try:
        snapshot = federation_status(config, user=user, password=password)
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    try:
        read, jobs, transport = _events_reader(config, party)
        try:
            snapshot_events(read, jobs)
        finally:
            transport.close()
        views = list(jobs.views.values())[-job_count:][::-1]
        snapshot["jobs"] = [view.as_dict() for view in views]
    except FedrelayError as e:
        snapshot["jobs"] = None
        snapshot["jobs_error"] = f"the events log could not be read as {party!r}: {e}"
    if as_json:
        click.echo(json.dumps(snapshot, indent=2))
        return
    table = Table(title=f"federation {config.federation} on vhost {config.broker.vhost}")
    for column in ("queue", "ready", "unacked", "consumers"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for queue in snapshot["queues"]:
        table.add_row(
            queue["name"], str(queue["ready"]), str(queue["unacked"]), str(queue["consumers"])
        )
    console = Console()
    console.print(table)
    listening = ", ".join(snapshot["sites_listening"]) or "none"
    console.print(f"sites listening (idle, waiting for work): {listening}")
    hint = " (`fedrelay dead list` shows them)" if snapshot["dead_letters"] else ""
    console.print(f"dead letters: {snapshot['dead_letters']}{hint}")
    if snapshot["jobs"] is None:
        console.print(f"[yellow]{snapshot['jobs_error']}")
    for view in views if snapshot["jobs"] else []:
        console.print(_job_line(view))
        for site in view.sites:
            console.print(
                f"  {site}: {view.per_site[site].trained}/{view.steps} trained, "
                f"{_site_line(view, site) or 'nothing yet'}"
            )
        for note in view.notes[-3:]:
            console.print(f"  - {note}")


@main.command("preflight")
@config_option
@click.option(
    "--site",
    default=None,
    envvar="FEDRELAY_SITE",
    help="Check this site here, before its node starts, with its own credentials and data  "
    "[default: probe every site's running node, as the aggregator]",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=30.0,
    show_default=True,
    help="Seconds to wait for the sites' answers (federation-wide).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@management_options(
    "Management API user, to see which sites' queues have a consumer (federation-wide)."
)
def preflight_command(
    *,
    config_path: Path,
    site: str | None,
    timeout_s: float,
    as_json: bool,
    user: str,
    password: str,
) -> None:
    """Before a long job: is each site reachable, with the right credentials and rights, its
    data found and compatible, a device, and disk for its spool? Exits 1 if a check fails."""
    from node.preflight import check_federation, check_site, table

    config = _load(config_path)
    if site is not None:
        report = check_site(config, site, source=config_path)
    else:
        report = check_federation(
            config, source=config_path, timeout_s=timeout_s, user=user, password=password
        )
    if as_json:
        click.echo(json.dumps(report.as_dict(), indent=2))
    else:
        console = Console()
        console.print(table(report))
        failed = [f"{c.site} {c.check}" for c in report.checks if c.status == "fail"]
        verdict = f"[bold red]failed: {', '.join(failed)}" if failed else "[green]ready"
        console.print(f"preflight: {verdict}")
    if not report.ok:
        sys.exit(1)


# -- dead letters: list, show, replay ---------------------------------------------------------


@main.group()
def dead() -> None:
    """Dead-lettered messages: list them, show one, replay one once its cause is fixed.

    Headers only: a payload (weights) is never printed; `show --payload FILE` writes it to a
    file. Reading the dead-letter queue takes every message and gives all back in order."""


_management_login = management_options(
    "Management API user: the federation's monitoring or operator user."
)


def _size(size: int) -> str:
    if size < 1024:
        return f"{size} B"
    return f"{size / 1024:.1f} KiB" if size < 1024**2 else f"{size / 1024**2:.1f} MiB"


@dead.command("list")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_management_login
def dead_list(config_path: Path, as_json: bool, user: str, password: str) -> None:
    """One row per dead letter, head of the queue first: position, message id, kind, job,
    sender → recipient, round/hop, chunk, size, reason, who refused it, when."""
    from rich.text import Text

    from node.dead import list_dead

    config = _load(config_path)
    try:
        letters = list_dead(config, user=user, password=password)
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    queue = config.topology().dead_queue
    if as_json:
        rows = [letter.summary() for letter in letters]
        listing = {"federation": config.federation, "queue": queue, "dead_letters": rows}
        click.echo(json.dumps(listing, indent=2, default=str))
        return
    console = Console()
    if not letters:
        console.print(Text(f"no dead letters in {queue}"))
        return
    table = Table(title=Text(f"dead letters of {config.federation} ({queue}), head first"))
    columns = ("#", "message id", "kind", "job", "from → to", "round/hop", "chunk", "size")
    for column in (*columns, "reason", "refused by", "time (UTC)"):
        table.add_column(column, justify="right" if column in ("#", "size") else "left")
    for letter in letters:
        row = {key: "" if value is None else value for key, value in letter.summary().items()}
        when = letter.time
        reason = row["reason"] if len(row["reason"]) <= 100 else row["reason"][:99] + "…"
        cells = [
            str(row["position"]),
            row["message_id"][:12],  # a unique prefix selects it
            str(row["kind"]),
            str(row["job"])[:12],
            f"{row['sender']} → {row['recipient']}" if letter.envelope is not None else "?",
            f"{row['round']}/{row['hop']}" if letter.envelope is not None else "",
            str(row["chunk"]),
            _size(letter.size),
            reason,
            row["refused_by"],
            when.strftime("%Y-%m-%d %H:%M:%S") if when is not None else "",
        ]
        table.add_row(*(Text(cell) for cell in cells))
    console.print(table)
    console.print(
        "`fedrelay dead show <#|id>` shows one; `fedrelay dead replay <#|id>` puts it back",
        markup=False,
    )


def _print_section(title: str, values: dict[str, Any], *, skip_none: bool = False) -> None:
    click.echo(f"{title}:")
    for key, value in values.items():
        if value is None and skip_none:
            continue
        shown = value if isinstance(value, str) else json.dumps(value, default=str)
        click.echo(f"  {key}: {shown}")


@dead.command("show")
@click.argument("selector")
@config_option
@click.option(
    "--payload",
    "payload_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Also write its payload (all chunks, in order) to this new file, mode 0600 (it may "
    "be weights; ciphertext if the federation encrypts). Never to the terminal.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_management_login
def dead_show(
    *,
    selector: str,
    config_path: Path,
    payload_path: Path | None,
    as_json: bool,
    user: str,
    password: str,
) -> None:
    """One dead letter: its envelope header, AMQP properties and headers, and why it was
    refused; no payload. SELECTOR: its position in `dead list` (3 or #3), or its message id
    or the first 6 or more characters of it (with .<chunk> for one chunk)."""
    from node.dead import SavedPayload, Selector, connect, list_dead, save_payload, select

    config = _load(config_path)
    if payload_path is not None and str(payload_path) == "-":
        raise click.UsageError("--payload: a payload is never written to the terminal; name a file")
    saved: SavedPayload | None = None
    try:
        chosen = Selector.parse(selector)
        selection = select(list_dead(config, user=user, password=password), chosen)
        if payload_path is not None:
            transport = connect(config, user=user, password=password)
            try:
                saved = save_payload(transport, config.topology(), chosen, payload_path)
            finally:
                transport.close()
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    detail = selection.named.detail()
    detail["message_in_queue"] = [letter.position for letter in selection.chunks]
    detail["missing_chunks"] = selection.missing
    if saved is not None:
        detail["payload_file"] = str(saved.path)
        detail["payload_digest_matches"] = saved.digest_matches
    if as_json:
        click.echo(json.dumps(detail, indent=2, default=str))
        return
    envelope = detail.pop("envelope")
    properties = detail.pop("properties")
    headers = detail.pop("headers")
    _print_section(f"dead letter #{detail.pop('position')}", detail, skip_none=True)
    if envelope is not None:
        _print_section("envelope header", envelope)
    _print_section("AMQP properties", properties)
    _print_section("AMQP headers", headers)
    if saved is not None:
        check = "matches" if saved.digest_matches else "DIFFERS FROM"
        click.echo(
            f"payload: {saved.size} bytes written to {saved.path}; its sha256 {check} the "
            "envelope's payload_digest"
        )
    else:
        click.echo("payload: not shown (--payload FILE writes it to a file)")


@dead.command("replay")
@click.argument("selector")
@config_option
@click.option("--dry-run", is_flag=True, help="Say what would be replayed; change nothing.")
@click.option(
    "--user",
    default=None,
    help="Broker user with the impersonator tag  [default: <federation>-operator]",
)
@click.option(
    "--password",
    default=None,
    envvar="FEDRELAY_OPERATOR_PASSWORD",
    help="Its password (the provisioned operator's is in operator/credentials.toml).",
)
def dead_replay(
    selector: str, config_path: Path, dry_run: bool, user: str | None, password: str | None
) -> None:
    """Put one dead-lettered message back where it was refused, once the cause is fixed:
    republished byte for byte as its original sender (every chunk, in order), and removed
    from the dead-letter queue once the broker confirmed it. SELECTOR as for `dead show`."""
    from node.dead import Selector, connect, replay
    from node.provision import operator_user

    config = _load(config_path)
    user = user or operator_user(config.federation)
    if password is None:
        raise click.UsageError(
            f"replay logs in to the broker as {user!r}: give --password or "
            "FEDRELAY_OPERATOR_PASSWORD (the provisioned operator's is in "
            "operator/credentials.toml)"
        )
    try:
        chosen = Selector.parse(selector)
        transport = connect(config, user=user, password=password)
        try:
            done = replay(transport, config.topology(), chosen, dry_run=dry_run)
        finally:
            transport.close()
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    selection = done.selection
    positions = ", ".join(f"#{letter.position}" for letter in selection.chunks)
    verb = "would replay" if dry_run else "replayed"
    click.echo(
        f"{verb} {selection.description}, dead letter {positions}, to routing key "
        f"{done.routing_key!r} as user_id {done.user_id!r}"
    )
    if selection.copies:
        copies = ", ".join(f"#{letter.position}" for letter in selection.copies)
        click.echo(f"copies of the same message stay in the dead-letter queue: {copies}")
    if dry_run:
        click.echo("nothing changed (--dry-run)")
    else:
        click.echo(f"{done.remaining} dead letter(s) remain")


if __name__ == "__main__":
    sys.exit(main())
