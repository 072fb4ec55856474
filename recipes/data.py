"""In-memory DataModules for the recipes: ``digits`` (bundled with scikit-learn) and ``synthetic``.

Both hold every split as tensors, yield ``(x, y)`` with ``x`` of shape ``(batch, *image_shape)`` (float32)
and ``y`` class indices (int64), and train with an :class:`~recipes.samplers.EpochSeededSampler`, so the
order of epoch ``e`` depends only on ``(shuffle_seed, e)`` and resuming from an epoch-end checkpoint is
exact. ``batch_size`` is per process, as everywhere in Lightning: under DDP each rank takes its shard.

``input_dim``, ``image_shape`` and ``num_classes`` are accepted (and checked) so that model configs can
interpolate them (``${data.input_dim}``) instead of repeating numbers that must agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_stablelr.validation import check_finite_positive, check_in_range, check_int_at_least
from recipes.samplers import EpochSeededSampler, epoch_seed

__all__ = ["DigitsDataModule", "SyntheticDataModule", "standardize"]

DIGITS_SAMPLES = 1797  # len(sklearn.datasets.load_digits().target)


def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Scale every array with the train split's per-feature statistics: ``(x - mean_tr) / std_tr``.

    Features that are constant on the train split (the digits' corner pixels) keep ``std = 1`` instead of
    dividing by zero. Only train statistics are used, so validation data never leaks into training.
    """
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-8, std, 1.0)
    return [((array - mean) / std).astype(np.float32) for array in (train, *others)]


class _TensorDataModule(L.LightningDataModule):
    """Loaders over in-memory ``train``/``val``/``test`` splits built once by ``_make_splits``."""

    def __init__(
        self,
        *,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        pin_memory: bool,
        shuffle_seed: int,
        input_dim: int,
        image_shape: Sequence[int],
        num_classes: int,
    ) -> None:
        super().__init__()
        self.batch_size = check_int_at_least("batch_size", batch_size, 1)
        self.eval_batch_size = check_int_at_least(
            "eval_batch_size", eval_batch_size if eval_batch_size is not None else 1024, 1
        )
        self.num_workers = check_int_at_least("num_workers", num_workers, 0, "Use 0 to load in the main process.")
        self.pin_memory = bool(pin_memory)
        self.shuffle_seed = check_int_at_least("shuffle_seed", shuffle_seed, 0)
        self.image_shape = tuple(int(size) for size in image_shape)
        self.input_dim = check_int_at_least("input_dim", input_dim, 1)
        self.num_classes = check_int_at_least("num_classes", num_classes, 2)
        if math.prod(self.image_shape) != self.input_dim:
            raise ValueError(
                f"`image_shape` must have {self.input_dim} elements (= `input_dim`), got {list(self.image_shape)}."
                " Set data.image_shape and data.input_dim consistently."
            )
        self.splits: dict[str, TensorDataset] | None = None

    def _make_splits(self) -> dict[str, TensorDataset]:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the splits once; every stage (fit, validate, test) reuses them."""
        if self.splits is None:
            self.splits = self._make_splits()

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> TensorDataset:
        features = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(-1, *self.image_shape)
        return TensorDataset(features, torch.from_numpy(np.asarray(y, dtype=np.int64)))

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        assert self.splits is not None
        dataset = self.splits[split]
        sampler = EpochSeededSampler(len(dataset), seed=self.shuffle_seed, shuffle=train)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)


class DigitsDataModule(_TensorDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes), bundled: no download.

    The split is a permutation drawn from ``split_seed``: the first ``train_size`` images train, the next
    ``val_size`` validate and the rest (at least one) test. Features are standardized with the train split's
    statistics. A small ``train_size`` (300 by default) lets a 64-512-512-10 MLP overfit within a few dozen
    epochs, which gives StableLR's gap factor something to do.

    Args:
        train_size: training images (``>= 1``).
        val_size: validation images (``>= 1``); ``train_size + val_size`` must leave a test image.
        split_seed: seed of the split permutation (kept fixed across a seed sweep by default, so seeds vary
            the initialisation and the order, not the data).
        shuffle_seed: seed of the training order (the recipes pass ``${seed}``).
        batch_size / eval_batch_size: per-process batch sizes for training / evaluation.
        image_shape: ``[1, 8, 8]`` for CNNs; any shape with 64 elements.
    """

    def __init__(
        self,
        train_size: int = 300,
        val_size: int = 500,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = 1024,
        num_workers: int = 0,
        pin_memory: bool = False,
        input_dim: int = 64,
        image_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shuffle_seed=shuffle_seed,
            input_dim=input_dim,
            image_shape=image_shape,
            num_classes=num_classes,
        )
        if self.input_dim != 64 or self.num_classes != 10:
            raise ValueError(
                f"`input_dim`/`num_classes` of the digits must be 64/10, got {input_dim}/{num_classes}."
                " Leave data.input_dim and data.num_classes at their defaults."
            )
        self.train_size = check_int_at_least("train_size", train_size, 1)
        self.val_size = check_int_at_least("val_size", val_size, 1)
        if self.train_size + self.val_size > DIGITS_SAMPLES - 1:
            raise ValueError(
                f"`train_size` + `val_size` must be at most {DIGITS_SAMPLES - 1} (the digits have "
                f"{DIGITS_SAMPLES} images and the test split needs one), got {train_size} + {val_size}."
                " Lower data.train_size or data.val_size."
            )
        self.split_seed = check_int_at_least("split_seed", split_seed, 0)

    def _make_splits(self) -> dict[str, TensorDataset]:
        from sklearn.datasets import load_digits

        features, labels = load_digits(return_X_y=True)
        order = np.random.default_rng(self.split_seed).permutation(len(labels))
        train_idx = order[: self.train_size]
        val_idx = order[self.train_size : self.train_size + self.val_size]
        test_idx = order[self.train_size + self.val_size :]
        x_train, x_val, x_test = standardize(features[train_idx], features[val_idx], features[test_idx])
        return {
            "train": self._tensors(x_train, labels[train_idx]),
            "val": self._tensors(x_val, labels[val_idx]),
            "test": self._tensors(x_test, labels[test_idx]),
        }


class SyntheticDataModule(_TensorDataModule):
    """A seeded Gaussian-mixture **classification** task (chosen over regression so that the same
    ``Classifier``, losses and accuracy apply to every data set).

    Class ``k`` has a mean ``m_k ~ N(0, I)`` in ``input_dim`` dimensions; a sample of class ``y`` is
    ``x = m_y + noise · N(0, I)``, and a fraction ``label_noise`` of the training labels is replaced by
    uniformly random classes (validation and test labels stay clean). The means come from
    ``torch.Generator().manual_seed(data_seed)`` and split ``k`` (train 1, val 2, test 3) from a generator
    seeded with ``epoch_seed(data_seed, k)``, so the data is identical on every machine and rank, and
    ``label_noise`` changes only the training labels.

    Args:
        train_size / val_size / test_size: samples per split (``>= 1``).
        noise: within-class standard deviation (``> 0``); larger is harder.
        label_noise: fraction of training labels randomized (in ``[0, 1]``); makes overfitting visible.
        data_seed: seed of the data; ``shuffle_seed``: seed of the training order.
    """

    def __init__(
        self,
        train_size: int = 1000,
        val_size: int = 500,
        test_size: int = 500,
        noise: float = 3.0,
        label_noise: float = 0.0,
        data_seed: int = 0,
        shuffle_seed: int = 0,
        batch_size: int = 32,
        eval_batch_size: int | None = 1024,
        num_workers: int = 0,
        pin_memory: bool = False,
        input_dim: int = 64,
        image_shape: Sequence[int] = (1, 8, 8),
        num_classes: int = 10,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            shuffle_seed=shuffle_seed,
            input_dim=input_dim,
            image_shape=image_shape,
            num_classes=num_classes,
        )
        self.sizes = {
            "train": check_int_at_least("train_size", train_size, 1),
            "val": check_int_at_least("val_size", val_size, 1),
            "test": check_int_at_least("test_size", test_size, 1),
        }
        self.noise = check_finite_positive("noise", noise)
        self.label_noise = check_in_range("label_noise", label_noise, 0.0, 1.0)
        self.data_seed = check_int_at_least("data_seed", data_seed, 0)

    def _make_splits(self) -> dict[str, TensorDataset]:
        means = torch.randn(self.num_classes, self.input_dim, generator=torch.Generator().manual_seed(self.data_seed))
        splits = {}
        for index, (split, size) in enumerate(self.sizes.items(), start=1):
            # One generator per split: changing label_noise (or a split's size) leaves the other splits intact.
            generator = torch.Generator().manual_seed(epoch_seed(self.data_seed, index))
            labels = torch.randint(self.num_classes, (size,), generator=generator)
            features = means[labels] + self.noise * torch.randn(size, self.input_dim, generator=generator)
            if split == "train" and self.label_noise > 0:
                flip = torch.rand(size, generator=generator) < self.label_noise
                random_labels = torch.randint(self.num_classes, (size,), generator=generator)
                labels = torch.where(flip, random_labels, labels)
            splits[split] = self._tensors(features.numpy(), labels.numpy())
        return splits
