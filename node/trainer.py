"""What a site does with a model: train it on local cases, and score models on held-out ones.

:class:`SiteAlgo` is the contract the relay workflows rely on, after MONAI FL's
``ClientAlgo`` (train / evaluate with typed values in and out).
:class:`SegmentationTrainer` implements it for multi-label brain-tumour segmentation
(BraTS regions WT, TC, ET) with MONAI networks, on CPU.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric, compute_hausdorff_distance

from node.algo import SiteAlgo, TrainResult
from node.data import Case
from node.models import build_model
from node.phantom import REGIONS
from relay.codec import StateDict
from relay.errors import ConfigError, InvalidInput
from relay.jobspec import JobSpec, ModelSpec, TrainingSpec

_THRESHOLD = 0.5


@dataclass(frozen=True)
class Dice:
    """Scores on a site's validation cases for the three BraTS regions: Dice in [0, 1], and
    the 95th-percentile Hausdorff distance in mm (from the cases' voxel spacing; see
    :func:`_hd95` for regions absent from a case or its prediction), None if not measured."""

    wt: float
    tc: float
    et: float
    hd95_wt: float | None = None
    hd95_tc: float | None = None
    hd95_et: float | None = None

    @property
    def mean(self) -> float:
        """The unweighted mean Dice over WT, TC and ET."""
        return (self.wt + self.tc + self.et) / 3

    def as_dict(self) -> dict[str, float]:
        """Flat metric names for logs and reports; distances not measured are left out."""
        scores = {
            "dice_wt": self.wt,
            "dice_tc": self.tc,
            "dice_et": self.et,
            "dice_mean": self.mean,
        }
        for region in REGIONS:
            distance = getattr(self, f"hd95_{region}")
            if distance is not None:
                scores[f"hd95_{region}"] = distance
        return scores


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
    uses Dice + BCE on sigmoid outputs and Adam, on whole volumes, or, with the job's
    ``training.patch_size``, on random crops of that size, half of them centred on tumour
    (as MONAI's ``RandCropByPosNegLabeld``); evaluation then runs by sliding window over each
    whole case, so real, full-size volumes of any size are scored. Each call of :meth:`train`
    draws from a generator seeded from ``(seed, round)``, so the same inputs give the same
    weights.

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
        cases: Sequence[Case],
        val_fraction: float = 0.25,
        seed: int,
        augment: bool = True,
        validation: Sequence[Case] | None = None,
    ) -> None:
        _check_cases(model, training, [*cases, *(validation or ())])
        if seed < 0:
            raise ConfigError(f"seed = {seed}; expected an integer >= 0")
        if validation is not None:
            # A split made elsewhere (a centralized baseline pools the sites' training cases
            # and scores on their validation cases): ``cases`` are all for training.
            self._train, self._val = list(cases), list(validation)
            shared = {c.name for c in self._train} & {c.name for c in self._val}
            if shared:
                raise ConfigError(
                    f"cases {sorted(shared)[:5]} are both training and validation cases"
                )
        else:
            self._train, self._val = _split(cases, val_fraction, seed)
        if not self._train or not self._val:
            raise ConfigError(
                f"{len(self._train)} training and {len(self._val)} validation case(s); a "
                "trainer needs at least one of each"
            )
        # Tumour voxels to centre crops on; only patch training crops.
        self._tumour = (
            [torch.nonzero(case.label[0]) for case in self._train]
            if training.patch_size is not None
            else []
        )

        self._spec = model
        self._training = training
        self._patch = training.patch_size
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
    def training_cases(self) -> tuple[Case, ...]:
        """The cases this trainer trains on."""
        return tuple(self._train)

    @property
    def validation_cases(self) -> tuple[Case, ...]:
        """The cases this trainer holds out for :meth:`evaluate`."""
        return tuple(self._val)

    @property
    def train_count(self) -> int:
        """Cases this site trains on."""
        return len(self._train)

    @property
    def validation_count(self) -> int:
        """Cases this site holds out for evaluation."""
        return len(self._val)

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
            order = torch.randperm(cases, generator=generator).tolist()
            total = 0.0
            for start in range(0, cases, batch_size):
                batch = order[start : start + batch_size]
                images, labels = self._batch(batch, generator)
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
        """Scores on the validation cases of one model, or of the ensemble of ``members``."""
        if not members:
            raise ValueError("evaluate needs at least one set of weights; got none")
        probabilities = [torch.zeros_like(case.label) for case in self._val]
        for member in members:
            self._load(member)
            self._model.eval()
            with torch.inference_mode():
                for index, case in enumerate(self._val):
                    probabilities[index] += self._probabilities(case.image)
        # ignore_empty=False: a region absent from a case and from its prediction scores 1,
        # not NaN, so the mean stays defined.
        dice = DiceMetric(include_background=True, reduction="mean_batch", ignore_empty=False)
        distances: list[list[float]] = [[] for _ in REGIONS]  # per region, every case
        for total, case in zip(probabilities, self._val, strict=True):
            prediction = (total / len(members) >= _THRESHOLD).float()[None]
            dice(y_pred=prediction, y=case.label[None])
            for region, distance in enumerate(_hd95(prediction, case)):
                distances[region].append(distance)
        scores = [float(value) for value in dice.aggregate().tolist()]
        hd95 = [sum(d) / len(d) for d in distances]
        return Dice(*scores, *hd95)

    def finalize(self, job_id: str) -> None:
        """Drop the optimizer state kept for ``job_id``; a no-op if none is kept."""
        self._optimizers.pop(job_id, None)

    def _batch(
        self, indices: list[int], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._patch is None:
            images = [self._train[i].image for i in indices]
            labels = [self._train[i].label for i in indices]
        else:
            crops = [self._crop(i, self._patch, generator) for i in indices]
            images, labels = [c[0] for c in crops], [c[1] for c in crops]
        return torch.stack(images), torch.stack(labels)

    def _crop(
        self, index: int, patch: tuple[int, int, int], generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        case, tumour = self._train[index], self._tumour[index]
        image, label = _pad_to(case.image, patch), _pad_to(case.label, patch)
        size = image.shape[1:]
        if len(tumour) and torch.rand((), generator=generator).item() < 0.5:
            centre = tumour[int(torch.randint(len(tumour), (), generator=generator))].tolist()
        else:
            centre = [int(torch.randint(side, (), generator=generator)) for side in size]
        start = [
            min(max(c - p // 2, 0), s - p) for c, p, s in zip(centre, patch, size, strict=True)
        ]
        window = tuple(slice(b, b + p) for b, p in zip(start, patch, strict=True))
        return image[(slice(None), *window)], label[(slice(None), *window)]

    def _probabilities(self, image: torch.Tensor) -> torch.Tensor:
        if self._patch is None:
            return torch.sigmoid(self._model(image[None]))[0]
        logits = sliding_window_inference(
            image[None],
            roi_size=self._patch,
            sw_batch_size=self._training.batch_size,
            predictor=self._model,
            overlap=0.25,
            mode="gaussian",
        )
        assert isinstance(logits, torch.Tensor)
        return torch.sigmoid(logits)[0]

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


def _split(cases: Sequence[Case], val_fraction: float, seed: int) -> tuple[list[Case], list[Case]]:
    """Training and validation cases, a ``val_fraction`` (at least one) held out from ``seed``."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction = {val_fraction}; expected a fraction in (0, 1)")
    n_val = max(1, round(len(cases) * val_fraction))
    if len(cases) - n_val < 1:
        raise ConfigError(
            f"{len(cases)} case(s) with val_fraction = {val_fraction} leave none to train "
            "on; give the site more cases or lower val_fraction"
        )
    order = torch.randperm(len(cases), generator=torch.Generator().manual_seed(seed)).tolist()
    return [cases[i] for i in order[n_val:]], [cases[i] for i in order[:n_val]]


def _hd95(prediction: torch.Tensor, case: Case) -> list[float]:
    """Per region, the 95th-percentile Hausdorff distance in mm, scored as BraTS does where
    it is undefined: 0 when the region is absent from both labels and prediction, and the
    volume's diagonal (the largest distance it holds) when it is absent from only one, so
    a missed or hallucinated region costs the most, never nothing."""
    worst = math.dist(
        [0.0, 0.0, 0.0], [n * s for n, s in zip(case.label.shape[1:], case.spacing, strict=True)]
    )
    labelled = case.label.flatten(1).any(dim=1).tolist()
    predicted = prediction[0].flatten(1).any(dim=1).tolist()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns for every empty region
        distances = compute_hausdorff_distance(
            prediction,
            case.label[None],
            include_background=True,
            percentile=95,
            spacing=list(case.spacing),
        )
    return [
        float(d)
        if has_label and has_prediction
        else (0.0 if has_label == has_prediction else worst)
        for d, has_label, has_prediction in zip(
            distances[0].tolist(), labelled, predicted, strict=True
        )
    ]


def _pad_to(volume: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    short = [max(0, p - s) for p, s in zip(patch, volume.shape[1:], strict=True)]
    if not any(short):
        return volume
    # F.pad lists the last dimension first; background after z-normalisation is 0.
    pads = [amount for side in reversed(short) for amount in (side // 2, side - side // 2)]
    return torch.nn.functional.pad(volume, pads)


def _check_cases(spec: ModelSpec, training: TrainingSpec, cases: Sequence[Case]) -> None:
    for case in cases:
        image, label = case.image, case.label
        if image.ndim != 4 or label.ndim != 4:
            raise ConfigError(
                f"case {case.name}: image {tuple(image.shape)} and label {tuple(label.shape)}; "
                "expected 4-D tensors [channels, D, H, W]"
            )
        if image.shape[0] != spec.in_channels:
            raise ConfigError(
                f"case {case.name}: {image.shape[0]} image channels; model.in_channels = "
                f"{spec.in_channels}"
            )
        if spec.out_channels != len(REGIONS) or label.shape[0] != len(REGIONS):
            raise ConfigError(
                f"case {case.name}: model.out_channels = {spec.out_channels}, label has "
                f"{label.shape[0]} channels; expected {len(REGIONS)} ({', '.join(REGIONS)})"
            )
        if image.shape[1:] != label.shape[1:]:
            raise ConfigError(
                f"case {case.name}: image {tuple(image.shape)} and label "
                f"{tuple(label.shape)} differ in volume size"
            )
    if training.patch_size is not None:
        return
    sizes = sorted({tuple(case.image.shape[1:]) for case in cases})
    if len(sizes) > 1:
        raise ConfigError(
            f"cases differ in size ({sizes[0]} ... {sizes[-1]}); whole-volume training needs "
            "one size: set the job's training.patch_size to train on crops"
        )
    # Each level halves the volume and the decoder adds skip connections back, so every
    # side must divide evenly all the way down.
    factor = 2 ** (spec.depth - 1)
    if sizes and any(side % factor for side in sizes[0]):
        raise ConfigError(
            f"volume size {sizes[0]} is not divisible by {factor}, as model.depth = "
            f"{spec.depth} needs; set the job's training.patch_size, or lower the depth"
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


def trainer_factory(cases: Sequence[Case], *, seed: int) -> Callable[[JobSpec], SiteAlgo]:
    """A site's trainers: one per job, on this site's cases, with the job's model and settings."""

    def make(job: JobSpec) -> SiteAlgo:
        return SegmentationTrainer(model=job.model, training=job.training, cases=cases, seed=seed)

    return make
