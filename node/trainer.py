"""What a site does with a model: train it on local cases, and score models on held-out ones.

:class:`SiteAlgo` is the contract the relay workflows rely on, after MONAI FL's
``ClientAlgo`` (train / evaluate with typed values in and out).
:class:`SegmentationTrainer` implements it for multi-label brain-tumour segmentation
(BraTS regions WT, TC, ET) with MONAI networks, on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric

from node.models import build_model
from node.phantom import REGIONS
from relay.codec import StateDict
from relay.errors import ConfigError, InvalidInput
from relay.jobspec import JobSpec, ModelSpec, TrainingSpec

_THRESHOLD = 0.5


@dataclass(frozen=True)
class Dice:
    """Dice scores on a site's validation cases for the three BraTS regions, each in [0, 1]."""

    wt: float
    tc: float
    et: float

    @property
    def mean(self) -> float:
        """The unweighted mean over WT, TC and ET."""
        return (self.wt + self.tc + self.et) / 3

    def as_dict(self) -> dict[str, float]:
        """Flat metric names for logs and reports."""
        return {
            "dice_wt": self.wt,
            "dice_tc": self.tc,
            "dice_et": self.et,
            "dice_mean": self.mean,
        }


@dataclass(frozen=True)
class TrainResult:
    """Weights after local training, how many cases they were trained on, and the last loss.

    ``loss`` is the mean training loss over the last epoch.
    """

    weights: StateDict
    sample_count: int
    loss: float


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

    def evaluate(self, members: Sequence[StateDict]) -> Dice:
        """Dice of one model (a 1-member sequence) or of the ensemble of several on local cases.

        An ensemble averages its members' sigmoid probabilities before thresholding at 0.5.
        """
        ...

    def finalize(self, job_id: str) -> None:
        """The job is over at this site: drop whatever was kept for it between rounds."""
        ...


class _DiceBCELoss(torch.nn.Module):
    """Soft Dice plus binary cross-entropy, each on every channel independently.

    ``monai.losses.DiceCELoss(sigmoid=True)`` is not used: for more than one channel it
    applies softmax cross-entropy whatever ``sigmoid`` says, which is wrong for nested,
    overlapping regions and gives no gradient at all on background voxels.
    """

    def __init__(self) -> None:
        super().__init__()
        self.dice = DiceLoss(sigmoid=True)
        self.bce = torch.nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The summed loss for a batch of logits and 0/1 targets of the same shape."""
        loss: torch.Tensor = self.dice(logits, target) + self.bce(logits, target)
        return loss


class SegmentationTrainer:
    """:class:`SiteAlgo` for BraTS-style segmentation of one site's cases, on CPU.

    The cases are split once, from ``seed``, into training and validation cases. Training
    uses Dice + BCE on sigmoid outputs and Adam; each call of :meth:`train` shuffles with a
    generator seeded from ``(seed, round)``, so the same inputs give the same weights.

    With ``training.keep_optimizer_state`` the Adam state (moment estimates) of each job is
    kept between calls, in a dict keyed by ``job_id``, so a FedAvg site does not restart Adam
    every round; :meth:`finalize` drops it when the job is over. It is the only state kept
    between calls: every call loads the weights it is given.
    """

    def __init__(
        self,
        *,
        model: ModelSpec,
        training: TrainingSpec,
        images: torch.Tensor,
        labels: torch.Tensor,
        val_fraction: float = 0.25,
        seed: int,
        augment: bool = True,
    ) -> None:
        _check_data(model, images, labels)
        if not 0 < val_fraction < 1:
            raise ConfigError(f"val_fraction = {val_fraction}; expected a fraction in (0, 1)")
        if seed < 0:
            raise ConfigError(f"seed = {seed}; expected an integer >= 0")
        cases = images.shape[0]
        n_val = max(1, round(cases * val_fraction))
        if cases - n_val < 1:
            raise ConfigError(
                f"{cases} case(s) with val_fraction = {val_fraction} leave none to train on; "
                "give the site more cases or lower val_fraction"
            )
        order = torch.randperm(cases, generator=torch.Generator().manual_seed(seed))
        val, train = order[:n_val], order[n_val:]
        self._train_images = images[train].float().contiguous()
        self._train_labels = labels[train].float().contiguous()
        self._val_images = images[val].float().contiguous()
        self._val_labels = labels[val].float().contiguous()

        self._spec = model
        self._training = training
        self._seed = seed
        self._augment = augment
        # The network is built once and reloaded by every call; under a forked RNG so that
        # constructing a trainer does not shift the caller's random draws.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._model = build_model(model)
        self._loss = _DiceBCELoss()
        self._optimizers: dict[str, torch.optim.Adam] = {}

    @property
    def train_count(self) -> int:
        """Cases this site trains on."""
        return int(self._train_images.shape[0])

    @property
    def validation_count(self) -> int:
        """Cases this site holds out for evaluation."""
        return int(self._val_images.shape[0])

    def train(self, weights: StateDict, *, epochs: int, job_id: str, round: int) -> TrainResult:
        """Train from ``weights`` for ``epochs`` over the training cases; returns new tensors."""
        if epochs < 1:
            raise ConfigError(f"epochs = {epochs}; expected at least 1")
        if round < 0:
            raise ConfigError(f"round = {round}; expected an integer >= 0")
        self._load(weights)
        optimizer = self._optimizer(job_id)
        generator = torch.Generator().manual_seed(_round_seed(self._seed, round))
        self._model.train()
        cases, batch_size = self.train_count, self._training.batch_size
        epoch_loss = 0.0
        for _ in range(epochs):
            order = torch.randperm(cases, generator=generator)
            total = 0.0
            for start in range(0, cases, batch_size):
                batch = order[start : start + batch_size]
                images, labels = self._train_images[batch], self._train_labels[batch]
                if self._augment:
                    images, labels = _random_flip(images, labels, generator)
                optimizer.zero_grad(set_to_none=True)
                loss = self._loss(self._model(images), labels)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            epoch_loss = total / cases
        return TrainResult(weights=self._weights(), sample_count=cases, loss=epoch_loss)

    def evaluate(self, members: Sequence[StateDict]) -> Dice:
        """Dice on the validation cases of one model, or of the ensemble of ``members``."""
        if not members:
            raise ValueError("evaluate needs at least one set of weights; got none")
        probabilities = torch.zeros_like(self._val_labels)
        batch_size = self._training.batch_size
        for member in members:
            self._load(member)
            self._model.eval()
            with torch.inference_mode():
                for start in range(0, self.validation_count, batch_size):
                    images = self._val_images[start : start + batch_size]
                    probabilities[start : start + batch_size] += torch.sigmoid(self._model(images))
        prediction = (probabilities / len(members) >= _THRESHOLD).float()
        # ignore_empty=False: a region absent from a case and from its prediction scores 1,
        # not NaN, so the mean stays defined.
        metric = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
        metric(y_pred=prediction, y=self._val_labels)
        scores = [float(value) for value in metric.aggregate().tolist()]
        return Dice(**dict(zip(REGIONS, scores, strict=True)))

    def finalize(self, job_id: str) -> None:
        """Drop the optimizer state kept for ``job_id``; a no-op if none is kept."""
        self._optimizers.pop(job_id, None)

    def _optimizer(self, job_id: str) -> torch.optim.Adam:
        if not self._training.keep_optimizer_state:
            return torch.optim.Adam(self._model.parameters(), lr=self._training.learning_rate)
        if job_id not in self._optimizers:
            # Adam refers to the parameters by identity; the model object is never replaced,
            # only reloaded in place, so a kept optimizer stays attached to it.
            self._optimizers[job_id] = torch.optim.Adam(
                self._model.parameters(), lr=self._training.learning_rate
            )
        return self._optimizers[job_id]

    def _load(self, weights: StateDict) -> None:
        try:
            # Copies values into the model's own tensors; the caller's tensors are untouched.
            self._model.load_state_dict(weights, strict=True)
        except RuntimeError as error:
            raise InvalidInput(
                f"weights do not fit model {self._spec.name!r} "
                f"(width {self._spec.width}, depth {self._spec.depth}): {error}"
            ) from error

    def _weights(self) -> StateDict:
        return {
            name: value.detach().cpu().clone().contiguous()
            for name, value in self._model.state_dict().items()
        }


def _check_data(spec: ModelSpec, images: torch.Tensor, labels: torch.Tensor) -> None:
    if images.ndim != 5 or labels.ndim != 5:
        raise ConfigError(
            f"images {tuple(images.shape)} and labels {tuple(labels.shape)}: "
            "expected 5-D tensors [cases, channels, D, H, W]"
        )
    if images.shape[1] != spec.in_channels:
        raise ConfigError(
            f"images have {images.shape[1]} channels; model.in_channels = {spec.in_channels}"
        )
    if spec.out_channels != len(REGIONS) or labels.shape[1] != len(REGIONS):
        raise ConfigError(
            f"model.out_channels = {spec.out_channels}, labels have {labels.shape[1]} channels; "
            f"expected {len(REGIONS)} ({', '.join(REGIONS)})"
        )
    if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[2:]:
        raise ConfigError(
            f"images {tuple(images.shape)} and labels {tuple(labels.shape)} "
            "differ in case count or volume size"
        )
    # Each level halves the volume and the decoder adds skip connections back, so every
    # side must divide evenly all the way down.
    factor = 2 ** (spec.depth - 1)
    if any(side % factor for side in images.shape[2:]):
        raise ConfigError(
            f"volume size {tuple(images.shape[2:])} is not divisible by {factor}, "
            f"as model.depth = {spec.depth} needs; resize the volumes or lower the depth"
        )


def _round_seed(seed: int, round: int) -> int:
    # SeedSequence mixes the pair, so nearby (seed, round) pairs get unrelated streams.
    state = np.random.SeedSequence((seed, round)).generate_state(1, np.uint64)
    return int(state[0])


def _random_flip(
    images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    # Mirroring keeps image and labels consistent; one draw per axis for the whole batch.
    axes = [axis for axis in (2, 3, 4) if torch.rand((), generator=generator).item() < 0.5]
    if not axes:
        return images, labels
    return images.flip(axes), labels.flip(axes)


def trainer_factory(
    images: torch.Tensor, labels: torch.Tensor, *, seed: int
) -> Callable[[JobSpec], SiteAlgo]:
    """A site's trainers: one per job, on this site's cases, with the job's model and settings."""

    def make(job: JobSpec) -> SiteAlgo:
        return SegmentationTrainer(
            model=job.model, training=job.training, images=images, labels=labels, seed=seed
        )

    return make
