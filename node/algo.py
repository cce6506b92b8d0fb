"""The contract between fedrelay and a site's training code, and how a site names its own.

After MONAI FL's ``ClientAlgo``: a small, typed :class:`SiteAlgo` (train from given weights,
evaluate given weights, finalize a job) with one typed result each way. fedrelay's own
:class:`node.trainer.SegmentationTrainer` is one; a hospital plugs in its own, or a MONAI
bundle through :mod:`node.bundle`, by naming a factory in its site's configuration:

    [sites.site-1.trainer]
    factory = "mytraining.fedrelay:make"   # called as make(job, options) for every job
    options = { data = "/data/brats", epochs_per_round = 1 }

The factory is looked up when the node starts, so a wrong name fails at start-up; a
factory with a ``check(options)`` method has its options checked then too. It is site
configuration, read from the site's own file: nothing that arrives in a message can name
code to run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from relay.codec import StateDict
from relay.errors import ConfigError
from relay.jobspec import JobSpec


@dataclass(frozen=True)
class TrainResult:
    """Weights after local training, how many cases they were trained on (FedAvg's weight),
    and the mean training loss over the last epoch."""

    weights: StateDict
    sample_count: int
    loss: float


class Scores(Protocol):
    """What an evaluation found: flat metric names (``dice_mean``, ``hd95_wt``, ...) to values."""

    def as_dict(self) -> dict[str, float]:
        """The metrics, as published in events and results."""
        ...


class SiteAlgo(Protocol):
    """The site side of every workflow: train from given weights, evaluate given weights."""

    @property
    def train_count(self) -> int:
        """Cases this site trains on (the weight FedAvg gives its update)."""
        ...

    @property
    def validation_count(self) -> int:
        """Cases this site holds out for :meth:`evaluate`."""
        ...

    def train(self, weights: StateDict, *, epochs: int, job_id: str, round: int) -> TrainResult:
        """Train a copy of ``weights`` for ``epochs`` on local cases, leaving ``weights`` as is."""
        ...

    def evaluate(self, members: Sequence[StateDict]) -> Scores:
        """Scores of one model (a 1-member sequence) or of the ensemble of several on local
        cases; an ensemble averages its members' probabilities."""
        ...

    def finalize(self, job_id: str) -> None:
        """The job is over at this site: drop whatever was kept for it between rounds."""
        ...


AlgoFactory = Callable[[JobSpec], SiteAlgo]
"""Makes the site's training algorithm for a job (its model recipe and training settings)
over the site's own data; raises ConfigError when the site cannot run that job."""

CustomFactory = Callable[[JobSpec, Mapping[str, Any]], SiteAlgo]
"""A site's own trainer factory, as named in its configuration: ``make(job, options)``."""


def load_factory(reference: str, *, key: str) -> CustomFactory:
    """The callable ``module:attribute`` names; ``key`` is the setting it came from."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"{key} = {reference!r}; expected 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{key} = {reference!r}: cannot import {module_name!r} ({e}); is it installed in "
            "the node's environment?"
        ) from e
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError(f"{key} = {reference!r}: {module_name} has no callable {attribute!r}")
    return cast(CustomFactory, factory)


_CONTRACT = ("train", "evaluate", "finalize", "train_count", "validation_count")


def custom_factory(reference: str, options: Mapping[str, Any], *, key: str) -> AlgoFactory:
    """A site's trainers from its own factory, given the options its configuration holds.

    Whatever the factory raises for a job becomes a ConfigError naming the setting, so the
    job is refused with a reason (dead-lettered) and the node goes on.
    """
    make = load_factory(reference, key=key)
    check = getattr(make, "check", None)
    if callable(check):
        check(options)

    def trainer(job: JobSpec) -> SiteAlgo:
        try:
            algo = make(job, options)
        except ConfigError:
            raise
        except Exception as e:  # the site's own code: any failure refuses the job, with why
            raise ConfigError(
                f"{key} = {reference!r} failed for job {job.job_id}: {type(e).__name__}: {e}"
            ) from e
        missing = [name for name in _CONTRACT if not hasattr(algo, name)]
        if missing:
            raise ConfigError(
                f"{key} = {reference!r} returned a {type(algo).__name__} without {missing}; "
                "a site trainer has the methods and properties of node.algo.SiteAlgo"
            )
        return algo

    return trainer
