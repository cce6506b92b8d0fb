"""The ``fedrelay`` command line."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from node.config import FederationConfig
from node.config import load as load_config
from node.models import initial_weights
from node.operate import federation_status, submit_job, wait_for_job
from node.options import JobOptions
from node.process import aggregator, serve, site_node, stop_on_signals
from node.provision import OPERATOR, provision
from node.report import load_results, write_report
from node.results import MODEL_FILE
from node.simulate import RESULTS_FILE, SimulationConfig, SimulationResult, simulate
from relay.endpoint import Endpoint
from relay.envelope import AGGREGATOR, Command, Envelope, MetricsEnvelope
from relay.errors import ConfigError, FedrelayError
from relay.jobspec import Aggregation, Algorithm
from relay.transport.amqp import AmqpTransport
from relay.validation import describe

F = TypeVar("F", bound=Callable[..., Any])
Opts = TypeVar("Opts", bound=JobOptions)

COLUMNS = (("dice_wt", "WT"), ("dice_tc", "TC"), ("dice_et", "ET"), ("dice_mean", "mean"))


@click.group()
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """fedrelay: federated learning where models travel and images stay home."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


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
    config = _load(config_path)
    section = config.aggregator_section()
    try:
        transport = AmqpTransport(config.broker_settings(AGGREGATOR, section.password))
        transport.declare(config.topology())
        transport.close()
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"declared federation {config.federation!r} on vhost {config.broker.vhost!r}")


@main.command("report")
@click.argument("results", type=click.Path(path_type=Path, exists=True))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for report.md and its PNGs  [default: report/ beside the results]",
)
def report_command(results: Path, output: Path | None) -> None:
    """Write a markdown report with plots from a results.json (or its folder)."""
    try:
        result = load_results(results)
        folder = output or (results if results.is_dir() else results.parent) / "report"
        click.echo(write_report(result, folder))
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e


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
    _serve(lambda config: site_node(config, site), config_path)


@main.group("aggregator")
def aggregator_group() -> None:
    """The aggregator (coordinator) process."""


@aggregator_group.command("run")
@config_option
def aggregator_run(config_path: Path) -> None:
    """Serve the aggregator until SIGTERM/SIGINT; finished jobs go to its output folder."""
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


@main.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--user",
    default="guest",
    show_default=True,
    help="Management API user (needs the monitoring tag).",
)
@click.option("--password", default="guest", envvar="FEDRELAY_MONITOR_PASSWORD", show_default=True)
def status_command(config_path: Path, as_json: bool, user: str, password: str) -> None:
    """One screen: queues, consumers online, dead letters, the latest round/hop seen."""
    config = _load(config_path)
    try:
        snapshot = federation_status(config, user=user, password=password)
    except FedrelayError as e:
        raise click.ClickException(str(e)) from e
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
    console.print(f"dead letters: {snapshot['dead_letters']}")
    for reason in snapshot["dead_letter_reasons"][:5]:
        console.print(f"  - {reason}")
    if snapshot["last_event"]:
        console.print(f"latest event: {snapshot['last_event']}")


if __name__ == "__main__":
    sys.exit(main())
