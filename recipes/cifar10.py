"""CIFAR-10 through torchvision (downloads ~170 MB into ``data_dir`` in ``prepare_data``; for GPU users).

torchvision is imported only when data is needed, so composing and instantiating the config works without
it; a missing torchvision raises a :class:`~recipes.errors.RecipeError` that says ``pip install torchvision``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Subset

from lightning_stablelr.validation import check_int_at_least
from recipes.errors import RecipeError
from recipes.samplers import EpochSeededSampler

__all__ = ["CIFAR10DataModule", "import_torchvision"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TRAIN_IMAGES = 50_000


def import_torchvision() -> Any:
    """Return the ``torchvision`` module, or raise ``RecipeError`` saying how to install it."""
    try:
        import torchvision
    except ImportError:
        raise RecipeError(
            "This option needs torchvision, which is not installed. Install it with "
            "`pip install torchvision` (the build matching your torch), or use data=digits / model=mlp."
        ) from None
    return torchvision


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 with a seeded train/validation split of the 50k training images and the 10k test images.

    Training images get the usual random crop (padding 4) and horizontal flip; the order of epoch ``e``
    comes from an :class:`~recipes.samplers.EpochSeededSampler`. (The augmentation draws from the worker RNG,
    which ``seed_everything(workers=True)`` seeds, so a mid-training resume repeats the order but not the
    crops.)

    Args:
        data_dir: where torchvision stores the data set.
        val_size: training images held out for validation (in ``[1, 49999]``).
        train_size: training images used, the first of the split's remainder (``None``: all of them; ``debug=fast``
            sets 64).
        split_seed / shuffle_seed: seeds of the split and of the training order.
        batch_size / eval_batch_size: per-process batch sizes.
        num_workers: loader worker processes per rank.
        augment: ``False`` disables crop and flip.
    """

    def __init__(
        self,
        data_dir: str = "data",
        val_size: int = 5000,
        train_size: int | None = None,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 4,
        pin_memory: bool = True,
        augment: bool = True,
        input_dim: int = 3072,
        image_shape: tuple[int, ...] | list[int] = (3, 32, 32),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.data_dir = str(Path(data_dir))
        self.val_size = check_int_at_least("val_size", val_size, 1)
        if self.val_size >= CIFAR10_TRAIN_IMAGES:
            raise ValueError(f"`val_size` must be below {CIFAR10_TRAIN_IMAGES}, got {val_size}.")
        self.train_size = None if train_size is None else check_int_at_least("train_size", train_size, 1)
        if self.train_size is not None and self.train_size + self.val_size > CIFAR10_TRAIN_IMAGES:
            raise ValueError(
                f"`train_size` + `val_size` must be at most {CIFAR10_TRAIN_IMAGES}, got {train_size} + {val_size}."
                " Lower data.train_size or data.val_size."
            )
        self.split_seed = check_int_at_least("split_seed", split_seed, 0)
        self.shuffle_seed = check_int_at_least("shuffle_seed", shuffle_seed, 0)
        self.batch_size = check_int_at_least("batch_size", batch_size, 1)
        self.eval_batch_size = check_int_at_least("eval_batch_size", eval_batch_size, 1)
        self.num_workers = check_int_at_least("num_workers", num_workers, 0)
        self.pin_memory = bool(pin_memory)
        self.augment = bool(augment)
        if tuple(image_shape) != (3, 32, 32) or input_dim != 3072 or num_classes != 10:
            raise ValueError(
                "`image_shape`/`input_dim`/`num_classes` of CIFAR-10 must be [3, 32, 32]/3072/10, got "
                f"{list(image_shape)}/{input_dim}/{num_classes}. Leave them at their defaults."
            )
        self.image_shape = (3, 32, 32)
        self.input_dim = 3072
        self.num_classes = 10
        self.splits: dict[str, Any] | None = None

    def prepare_data(self) -> None:
        """Download once per node (Lightning calls this on local rank 0 only); a failed download raises
        :class:`~recipes.errors.RecipeError` naming the directory and how to provide the files."""
        torchvision = import_torchvision()
        try:
            torchvision.datasets.CIFAR10(self.data_dir, train=True, download=True)
            torchvision.datasets.CIFAR10(self.data_dir, train=False, download=True)
        except OSError as error:  # urllib.error.URLError is an OSError: no network, proxy, refused
            raise RecipeError(
                f"CIFAR-10 could not be downloaded into {Path(self.data_dir).resolve()} ({type(error).__name__}: "
                f"{error}). On a machine without internet, download cifar-10-python.tar.gz from "
                "https://www.cs.toronto.edu/~kriz/cifar.html elsewhere, put it in that directory (or point "
                "paths.data_dir=<dir> at one holding it), and rerun; the default task needs no download: "
                "python -m recipes.train."
            ) from error

    def setup(self, stage: str | None = None) -> None:
        """Build the three splits from the downloaded files (no download here)."""
        if self.splits is not None:
            return
        import torch

        torchvision = import_torchvision()
        transforms = torchvision.transforms
        normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if self.augment else []
        dataset = torchvision.datasets.CIFAR10
        train_full = dataset(self.data_dir, train=True, transform=transforms.Compose(augment + normalize))
        val_full = dataset(self.data_dir, train=True, transform=transforms.Compose(normalize))
        order = torch.randperm(len(train_full), generator=torch.Generator().manual_seed(self.split_seed)).tolist()
        self.splits = {
            "train": Subset(train_full, order[self.val_size :][: self.train_size]),
            "val": Subset(val_full, order[: self.val_size]),
            "test": dataset(self.data_dir, train=False, transform=transforms.Compose(normalize)),
        }

    def _loader(self, split: str, train: bool) -> DataLoader:
        self.setup()
        assert self.splits is not None
        data = self.splits[split]
        return DataLoader(
            data,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=EpochSeededSampler(len(data), seed=self.shuffle_seed, shuffle=train),
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
