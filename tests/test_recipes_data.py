"""The recipes' data, sampler and networks: exact orders, exact splits, exact shapes and parameter counts."""

from __future__ import annotations

import sys

import lightning as L
import numpy as np
import pytest
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from sklearn.datasets import load_digits

from recipes.data import DigitsDataModule, SyntheticDataModule, standardize
from recipes.errors import RecipeError
from recipes.models import MLP, SmallCNN, resnet18
from recipes.samplers import EpochSeededSampler, epoch_seed


def test_epoch_seed_formula():
    assert epoch_seed(0, 0) == 0 and epoch_seed(0, 5) == 5
    assert epoch_seed(1, 0) == 0x9E3779B1 and epoch_seed(3, 2) == 3 * 0x9E3779B1 + 2
    assert epoch_seed(0, 1) != epoch_seed(1, 0)


def test_sampler_order_is_a_function_of_seed_and_epoch():
    sampler = EpochSeededSampler(10, seed=7)
    orders = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        expected = torch.randperm(10, generator=torch.Generator().manual_seed(epoch_seed(7, epoch))).tolist()
        assert list(sampler) == expected == list(sampler)  # repeatable within an epoch
        orders.append(expected)
    assert len({tuple(order) for order in orders}) == 3
    fresh = EpochSeededSampler(10, seed=7)  # a resumed process: only the epoch is set
    fresh.set_epoch(2)
    assert list(fresh) == orders[2]
    assert list(EpochSeededSampler(4, seed=7, shuffle=False)) == [0, 1, 2, 3] and len(sampler) == 10


def test_sampler_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`num_samples` must be an integer >= 1, got 0. The data set is empty."):
        EpochSeededSampler(0)
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0, got -1"):
        EpochSeededSampler(5, seed=-1)


def test_ddp_shards_of_the_sampler_partition_one_permutation():
    # Lightning wraps a custom sampler in DistributedSamplerWrapper (shuffle=True, seed 0 by default) and
    # forwards set_epoch to it: both ranks must take disjoint halves of one permutation.
    for epoch in (0, 3):
        shards = []
        for rank in (0, 1):
            wrapper = DistributedSamplerWrapper(EpochSeededSampler(12, seed=1), num_replicas=2, rank=rank)
            wrapper.set_epoch(epoch)
            assert wrapper.dataset._sampler.epoch == epoch
            shards.append(list(wrapper))
        assert sorted(shards[0] + shards[1]) == list(range(12)) and len(shards[0]) == 6


class _OrderRecorder(L.Callback):
    def __init__(self) -> None:
        self.labels: dict[int, list[int]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.labels.setdefault(trainer.current_epoch, []).extend(batch[1].tolist())


class _Linear(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_sets_the_epoch_of_the_train_sampler(tmp_path):
    datamodule = DigitsDataModule(train_size=40, val_size=10, batch_size=8, shuffle_seed=3)
    recorder = _OrderRecorder()
    trainer = L.Trainer(
        max_epochs=3, callbacks=[recorder], logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(_Linear(), datamodule=datamodule)
    labels = datamodule.splits["train"].tensors[1]
    for epoch in range(3):
        order = torch.randperm(40, generator=torch.Generator().manual_seed(epoch_seed(3, epoch)))
        assert recorder.labels[epoch] == labels[order].tolist()


def test_digits_split_is_seeded_disjoint_and_standardized():
    datamodule = DigitsDataModule(train_size=300, val_size=500, split_seed=0)
    datamodule.setup()
    splits = datamodule.splits
    assert [len(splits[name]) for name in ("train", "val", "test")] == [300, 500, 997]
    features, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(1797)
    expected_train, *_ = standardize(features[order[:300]], features[order[300:800]])
    assert torch.equal(splits["train"].tensors[0], torch.from_numpy(expected_train).reshape(-1, 1, 8, 8))
    assert splits["val"].tensors[1].tolist() == labels[order[300:800]].tolist()
    assert splits["test"].tensors[1].tolist() == labels[order[800:]].tolist()
    flat = splits["train"].tensors[0].reshape(300, 64)
    varying = features[order[:300]].std(axis=0) > 1e-8
    assert flat.mean(0).abs().max() < 1e-5
    assert torch.allclose(flat.std(0, unbiased=False)[torch.from_numpy(varying)], torch.ones(int(varying.sum())))
    assert (flat[:, torch.from_numpy(~varying)] == 0).all()  # constant pixels: centred, not divided by 0
    other = DigitsDataModule(train_size=300, val_size=500, split_seed=1)
    other.setup()
    assert not torch.equal(other.splits["train"].tensors[1], splits["train"].tensors[1])


def test_digits_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"`train_size` \+ `val_size` must be at most 1796"):
        DigitsDataModule(train_size=1000, val_size=797)
    with pytest.raises(ValueError, match=r"`image_shape` must have 64 elements \(= `input_dim`\), got \[1, 8, 4\]"):
        DigitsDataModule(image_shape=(1, 8, 4))
    with pytest.raises(ValueError, match=r"`batch_size` must be an integer >= 1, got 0"):
        DigitsDataModule(batch_size=0)


def test_synthetic_data_is_seeded_and_label_noise_touches_only_training_labels():
    def splits(**kwargs):
        datamodule = SyntheticDataModule(train_size=2000, val_size=50, test_size=50, **kwargs)
        datamodule.setup()
        return {name: dataset.tensors for name, dataset in datamodule.splits.items()}

    clean, again, noisy = splits(), splits(), splits(label_noise=0.5)
    for name in ("train", "val", "test"):
        assert torch.equal(clean[name][0], again[name][0]) and torch.equal(clean[name][1], again[name][1])
        assert torch.equal(clean[name][0], noisy[name][0])
    assert torch.equal(clean["val"][1], noisy["val"][1]) and torch.equal(clean["test"][1], noisy["test"][1])
    changed = (clean["train"][1] != noisy["train"][1]).float().mean().item()
    assert 0.40 < changed < 0.50  # 0.5 flipped to a uniform class: 0.5 * 9/10 = 0.45 expected
    assert clean["train"][0].shape == (2000, 1, 8, 8)
    assert not torch.equal(splits(data_seed=1)["train"][0], clean["train"][0])


def test_networks_shapes_and_sizes():
    mlp = MLP()
    assert sum(p.numel() for p in mlp.parameters()) == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert mlp(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert MLP(hidden_dims=[], num_classes=3)(torch.zeros(2, 64)).shape == (2, 3)
    assert sum(isinstance(m, torch.nn.Dropout) for m in MLP(dropout=0.2).modules()) == 2
    assert SmallCNN()(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    assert SmallCNN(image_shape=(3, 32, 32), channels=(8, 16, 32))(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match=r"`channels` must have at most log2\(min\(height, width\)\) = 3 stages"):
        SmallCNN(image_shape=(1, 8, 8), channels=(4, 4, 4, 4))
    with pytest.raises(ValueError, match=r"`dropout` must be a finite number in \[0, 1\), got 1.0"):
        MLP(dropout=1.0)


def test_resnet18_without_torchvision_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(RecipeError, match=r"needs torchvision, which is not installed. Install it with "
                                          r"`pip install torchvision`"):
        resnet18()
    monkeypatch.delitem(sys.modules, "torchvision")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return  # the error path above is what this environment can check
    model = resnet18(image_shape=(3, 32, 32), num_classes=10)
    assert model.conv1.stride == (1, 1) and isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
