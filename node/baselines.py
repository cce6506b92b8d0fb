"""The references every federated result is read against, on the federation's own data.

- **Centralized**: one model trained on all sites' training cases pooled, as if the data
  could be shared; the ceiling federated learning aims for (Sheller et al. 2020).
- **Local only**: each site trains on its own cases alone; what a site gets without the
  federation. Each local model is also scored on every site's validation cases, which
  gives the best single local model an ensemble must beat.

Both get the training budget of the federated job they are compared with: ``rounds`` times
``local_epochs`` passes over the data they train on, so every case is seen as often as in a
FedAvg round or a ring cycle. Every site's validation cases are the ones the federation
scores on, split by the site's own trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from node.trainer import SegmentationTrainer
from relay.codec import StateDict
from relay.jobspec import JobSpec

Scores = dict[str, dict[str, float]]
"""Per site, the metrics of a model on that site's validation cases."""


@dataclass(frozen=True)
class BaselineRun:
    """A baseline's scores on every site's validation cases, after each round of its budget.

    For local-only training, ``history`` and ``final`` score each site's own model on its
    own cases, and ``cross`` scores each site's final model on every site's cases.
    """

    method: str
    history: list[Scores]
    cross: dict[str, Scores] = field(default_factory=dict)

    @property
    def final(self) -> Scores:
        """The scores after the whole budget."""
        return self.history[-1]


def centralized(
    trainers: Mapping[str, SegmentationTrainer], job: JobSpec, initial: StateDict
) -> BaselineRun:
    """One model on all sites' training cases pooled, scored at every site after each round."""
    pooled = [case for trainer in trainers.values() for case in trainer.training_cases]
    any_site = next(iter(trainers.values()))
    central = SegmentationTrainer(
        model=job.model,
        training=job.training,
        cases=pooled,
        validation=any_site.validation_cases,
        seed=job.seed,
    )
    weights, history = initial, []
    for round in range(job.rounds):
        epochs = job.training.local_epochs
        weights = central.train(weights, epochs=epochs, job_id="centralized", round=round).weights
        history.append(_scores(trainers, weights))
    return BaselineRun("centralized", history)


def local_only(
    trainers: Mapping[str, SegmentationTrainer], job: JobSpec, initial: StateDict
) -> BaselineRun:
    """Each site on its own cases alone; its model scored at home after each round, and at
    every site at the end."""
    models = dict.fromkeys(trainers, initial)
    history = []
    for round in range(job.rounds):
        for name, trainer in trainers.items():
            epochs = job.training.local_epochs
            models[name] = trainer.train(
                models[name], epochs=epochs, job_id="local", round=round
            ).weights
        history.append({name: trainers[name].evaluate([models[name]]).as_dict() for name in models})
    cross = {name: _scores(trainers, weights) for name, weights in models.items()}
    return BaselineRun("local", history, cross)


def _scores(trainers: Mapping[str, SegmentationTrainer], weights: StateDict) -> Scores:
    return {name: trainer.evaluate([weights]).as_dict() for name, trainer in trainers.items()}
