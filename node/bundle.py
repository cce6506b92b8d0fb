"""A site that trains with an existing MONAI bundle: its train and evaluate configs, run by
MONAI FL's ``MonaiAlgo`` behind fedrelay's :class:`node.algo.SiteAlgo` contract.

Name it in the site's configuration (never in a message)::

    [sites.site-1.trainer]
    factory = "node.bundle:bundle_trainer"
    options = { bundle = "/opt/bundles/brats_segresnet" }

Options: ``bundle`` (the bundle's folder, required), ``train_config`` (default
``configs/train.json``) and ``evaluate_config`` (default the train config plus
``configs/evaluate.json`` when there is one). The bundle's network must be the job's
registry network (:mod:`node.models`), so that its weights are the ones the federation
exchanges; this is checked when a job starts. Its evaluator's metrics are reported as they
are named in the bundle (``val_mean_dice``, ...).

MONAI warns that a bundle's config runs arbitrary code. Here the bundle is the site's own,
installed and configured by the site: nothing in a message can point a node at a bundle.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.fl.client import MonaiAlgo
from monai.fl.utils.constants import ExtraItems
from monai.fl.utils.exchange_object import ExchangeObject

from node.algo import SiteAlgo, TrainResult
from node.models import build_model
from relay.codec import StateDict
from relay.errors import ConfigError, InvalidInput
from relay.jobspec import JobSpec

log = logging.getLogger(__name__)

_OPTIONS = {"bundle", "train_config", "evaluate_config", "name"}


@dataclass(frozen=True)
class BundleScores:
    """The bundle evaluator's metrics, by the bundle's names."""

    metrics: Mapping[str, float]

    def as_dict(self) -> dict[str, float]:
        """The metrics, as published in events and results."""
        return dict(self.metrics)


class _BundleTrainer:
    """The site trainer factory for ``[sites.<name>.trainer]`` (see the module docstring)."""

    def check(self, options: Mapping[str, Any]) -> None:
        """Refuse unknown options, a missing bundle folder or config file, at start-up."""
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ConfigError(
                f"trainer.options: {unknown} are not bundle options; known: {sorted(_OPTIONS)}"
            )
        if "bundle" not in options:
            raise ConfigError("trainer.options.bundle: missing; name the MONAI bundle's folder")
        bundle, train, evaluate = self._files(options)
        for config in (train, *evaluate):
            if not (bundle / config).is_file():
                raise ConfigError(f"bundle {bundle}: no {config}; is this a MONAI bundle folder?")

    def __call__(self, job: JobSpec, options: Mapping[str, Any]) -> SiteAlgo:
        self.check(options)
        bundle, train, evaluate = self._files(options)
        name = str(options.get("name", "site"))
        return BundleAlgo(
            job=job, bundle=bundle, train_config=train, evaluate_config=evaluate, name=name
        )

    @staticmethod
    def _files(options: Mapping[str, Any]) -> tuple[Path, str, list[str]]:
        bundle = Path(options["bundle"])
        train = str(options.get("train_config", "configs/train.json"))
        evaluate = options.get("evaluate_config")
        if evaluate is None:
            extra = "configs/evaluate.json"
            evaluate = [train, extra] if (bundle / extra).is_file() else [train]
        return bundle, train, [evaluate] if isinstance(evaluate, str) else list(evaluate)


bundle_trainer = _BundleTrainer()
"""``node.bundle:bundle_trainer``: options checked when the node starts, a trainer per job."""


class BundleAlgo:
    """:class:`SiteAlgo` running a MONAI bundle's trainer and evaluator for one job."""

    def __init__(
        self,
        *,
        job: JobSpec,
        bundle: Path,
        train_config: str,
        evaluate_config: list[str],
        name: str,
    ) -> None:
        self._algo = MonaiAlgo(
            bundle_root=str(bundle),
            local_epochs=job.training.local_epochs,
            send_weight_diff=False,  # fedrelay exchanges weights, and averages them itself
            config_train_filename=train_config,
            config_evaluate_filename=evaluate_config,
        )
        with warnings.catch_warnings():
            # The "provisioned by the FL system" warning: this bundle is the site's own.
            warnings.filterwarnings("ignore", message="executing the bundle config")
            try:
                self._algo.initialize(extra={ExtraItems.CLIENT_NAME: name})
            except Exception as e:  # a bundle config can fail in any way MONAI or torch can
                raise ConfigError(f"bundle {bundle}: cannot be set up ({e})") from e
        trainer, evaluator = self._algo.trainer, self._algo.evaluator
        assert trainer is not None and evaluator is not None  # initialize() checked both
        self._trainer, self._evaluator = trainer, evaluator
        _check_network(trainer.network, job, bundle)

    @property
    def train_count(self) -> int:
        """Cases in the bundle's training dataset."""
        return len(self._trainer.data_loader.dataset)

    @property
    def validation_count(self) -> int:
        """Cases in the bundle's validation dataset."""
        return len(self._evaluator.data_loader.dataset)

    def train(self, weights: StateDict, *, epochs: int, job_id: str, round: int) -> TrainResult:
        """Load ``weights`` into the bundle's network and run its trainer for ``epochs``."""
        self._algo.local_epochs = epochs
        self._algo.train(ExchangeObject(weights=dict(weights)))
        trained = self._algo.get_weights().weights
        assert trained is not None
        out = {name: value.detach().cpu().clone().contiguous() for name, value in trained.items()}
        return TrainResult(weights=out, sample_count=self.train_count, loss=self._last_loss())

    def evaluate(self, members: Sequence[StateDict]) -> BundleScores:
        """The bundle evaluator's metrics for one model."""
        if len(members) != 1:
            raise InvalidInput(
                f"a bundle site scores one model at a time, got an ensemble of {len(members)}; "
                "run ensembles on sites with fedrelay's trainer"
            )
        result = self._algo.evaluate(ExchangeObject(weights=dict(members[0])))
        metrics = result.metrics or {}
        return BundleScores({str(k): float(v) for k, v in metrics.items()})

    def finalize(self, job_id: str) -> None:
        """The job is over: stop the bundle's trainer and evaluator, run its finalize steps."""
        self._algo.finalize()

    def _last_loss(self) -> float:
        # SupervisedTrainer's output is the last iteration's decollated batch, each item
        # holding the batch's loss.
        output = self._trainer.state.output
        if isinstance(output, list) and output and isinstance(output[0], dict):
            loss = output[0].get("loss")
            if isinstance(loss, torch.Tensor | float):
                return float(loss)
        return float("nan")


def _check_network(network: torch.nn.Module, job: JobSpec, bundle: Path) -> None:
    expected = {k: tuple(v.shape) for k, v in build_model(job.model).state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in network.state_dict().items()}
    if expected != actual:
        differ = sorted(set(expected) ^ set(actual)) or [
            k for k in expected if expected[k] != actual[k]
        ]
        raise ConfigError(
            f"bundle {bundle}: its network is not the job's {job.model.name!r} (width "
            f"{job.model.width}, depth {job.model.depth}); parameters differ: {differ[:5]}. "
            "Define the bundle's network_def as the registry network the job names"
        )
