"""The ``fedrelay`` command line."""

from __future__ import annotations

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

from node.simulate import MODEL_FILE, RESULTS_FILE, SimulationConfig, SimulationResult, simulate
from relay.envelope import Envelope, MetricsEnvelope
from relay.errors import FedrelayError
from relay.jobspec import Algorithm
from relay.validation import describe

F = TypeVar("F", bound=Callable[..., Any])

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
    """A ``simulate`` option whose default comes from SimulationConfig, so they never drift."""
    field = kwargs.pop("field", name.removeprefix("--").replace("-", "_"))
    default = SimulationConfig.model_fields[field].default
    if isinstance(default, Enum):
        default = default.value
    if "type" not in kwargs:
        kwargs["type"] = type(default)
    return click.option(
        name, field, default=default, show_default=default is not None, help=help, **kwargs
    )


@main.command("simulate")
@_option("--algorithm", "How the model travels.", type=click.Choice([a.value for a in Algorithm]))
@_option("--sites", "Number of sites (site-1, site-2, ...), each with its own data.")
@_option(
    "--rounds",
    "FedAvg rounds, CWT cycles, or ensemble training passes  [default: 10; 1 for swt]",
    type=int,
)
@_option("--local-epochs", "Epochs a site trains per round or ring visit.")
@_option("--seed", "Fixes the data, the initial model and the training order.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    default=Path("runs/simulate"),
    show_default=True,
    help="Folder for results.json and model.safetensors.",
)
@_option("--model", "Network from the node's registry.", type=click.Choice(["unet", "segresnet"]))
@_option("--width", "Channels of the network's first level.")
@_option("--depth", "Resolution levels of the network.")
@_option("--volume-size", "Phantom volumes are this many voxels per side.")
@_option("--cases-per-site", "Phantom cases per site (varies ±20% between sites).")
@_option("--batch-size", "Cases per training step.")
@_option("--learning-rate", "Adam's learning rate at each site.")
@_option(
    "--min-sites", "FedAvg quorum once a round's deadline passes  [default: every site]", type=int
)
@_option("--round-timeout", "Seconds a round waits for site updates.", field="round_timeout_s")
@_option("--chunk-size", "Payloads larger than this many bytes travel as chunks.")
@click.option("--json", "as_json", is_flag=True, help="Print results.json instead of a table.")
def simulate_command(output: Path, as_json: bool, **options: object) -> None:
    """Simulate a federation in this process, on generated brain-tumour data."""
    try:
        config = SimulationConfig.model_validate(options)
    except ValidationError as e:
        message = describe(e, what="option")
        message = re.sub(r"option\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), message)
        raise click.UsageError(message) from e
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


if __name__ == "__main__":
    sys.exit(main())
