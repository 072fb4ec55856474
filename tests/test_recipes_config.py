"""Every config option and experiment composes and instantiates; the peer policies follow their formulas;
impossible combinations fail in ``recipes.checks`` with the documented one-paragraph messages."""

from __future__ import annotations

import inspect
import math
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from recipes.checks import LOGGED_METRICS, check_config, check_devices
from recipes.errors import RecipeError, build
from recipes.runner import build_loggers, output_dir_of
from recipes.train import build_callbacks, build_model
from tests.test_recipes_helpers import CONF, CPU_TRAINER, compose_train, with_output_dir

GROUPS = ("data", "model", "optimizer", "lr_policy", "monitor", "trainer", "logger", "callbacks", "paths")
EXPERIMENTS = sorted(path.stem for path in (CONF / "experiment").glob("*.yaml"))


def _options(group: str) -> list[str]:
    return sorted(path.stem for path in (CONF / group).glob("*.yaml"))


def test_the_documented_options_exist():
    assert _options("data") == ["cifar10", "digits", "synthetic"]
    assert _options("model") == ["cnn", "mlp", "resnet18"]
    assert _options("optimizer") == ["adamw", "sgd"]
    assert _options("lr_policy") == ["constant", "cosine", "exponential", "plateau", "stablelr"]
    assert _options("monitor") == ["default", "full", "off"]
    assert _options("trainer") == ["cpu", "ddp", "ddp_cpu", "ddp_sim", "default", "fsdp", "gpu", "multinode"]
    assert _options("logger") == ["csv", "tensorboard"]
    assert EXPERIMENTS == ["cifar10_ddp", "digits_overfit", "lr_robustness"]
    assert (CONF / "hydra" / "launcher" / "slurm.yaml").is_file()


def test_default_config_is_the_documented_default_job():
    cfg = compose_train()
    assert cfg.data._target_ == "recipes.data.DigitsDataModule" and cfg.data.train_size == 300
    assert cfg.model.net._target_ == "recipes.models.MLP" and list(cfg.model.net.hidden_dims) == [512, 512]
    assert cfg.model.net.input_dim == 64 and cfg.model.net.num_classes == 10
    assert cfg.optimizer._target_ == "torch.optim.SGD" and cfg.optimizer.momentum == 0.9
    assert cfg.lr_policy.callback._target_ == "lightning_stablelr.StableLR" and cfg.lr_policy.scheduler is None
    assert cfg.monitor._target_ == "lightning_stablelr.StabilityMonitor"
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1 and cfg.trainer.max_epochs == 60
    assert cfg.data.shuffle_seed == cfg.seed == 0
    assert set(cfg.logger) == {"tensorboard"} and set(cfg.callbacks) == {"checkpoint", "progress_bar"}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_instantiates_on_cpu(group, tmp_path, monkeypatch):
    # resnet18 and cifar10 need torchvision only when they build a network or load data: without it,
    # building the network must fail with the install hint; the datamodule must instantiate regardless.
    for option in _options(group):
        if group == "paths":
            cfg = compose_train([f"paths={option}"])
            paths = OmegaConf.to_container(cfg.paths, resolve=False)
            assert paths == {
                "root_dir": ".",
                "data_dir": "${paths.root_dir}/data",
                "log_dir": "${paths.root_dir}/outputs",
                "output_dir": "${hydra:runtime.output_dir}",
            }
            continue
        overrides = [f"{group}={option}"] if group != "trainer" else [f"trainer={option}", *CPU_TRAINER]
        cfg = with_output_dir(compose_train(overrides + (CPU_TRAINER if group != "trainer" else [])), tmp_path)
        datamodule = build(cfg.data, "data")
        assert isinstance(datamodule, L.LightningDataModule)
        if cfg.model.net._target_.endswith("resnet18"):
            monkeypatch.setitem(sys.modules, "torchvision", None)
            with pytest.raises(RecipeError, match="pip install torchvision"):
                build(cfg.model, "model")
            monkeypatch.delitem(sys.modules, "torchvision")
            continue
        model = build(cfg.model, "model")
        x = torch.zeros(2, *cfg.data.image_shape)
        assert model(x).shape == (2, cfg.data.num_classes)
        check_config(cfg)
        trainer = build(cfg.trainer, "trainer", callbacks=build_callbacks(cfg, tmp_path), logger=build_loggers(cfg))
        assert isinstance(trainer, L.Trainer) and trainer.limit_train_batches == 2


def test_cifar10_datamodule_instantiates_without_downloading(tmp_path, monkeypatch):
    cfg = compose_train(["data=cifar10", f"paths.data_dir={tmp_path / 'data'}"])
    datamodule = build(cfg.data, "data")
    assert datamodule.data_dir == str(tmp_path / "data") and datamodule.image_shape == (3, 32, 32)
    assert not (tmp_path / "data").exists()
    monkeypatch.setitem(sys.modules, "torchvision", None)
    with pytest.raises(RecipeError, match=r"pip install torchvision"):
        datamodule.prepare_data()


def test_cifar10_takes_debug_fast_and_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    # debug=fast sets data.train_size, which the CIFAR-10 module once rejected with advice about an argument the
    # user never set; an offline download ended in two chained tracebacks.
    import types
    import urllib.error

    cfg = compose_train(["data=cifar10", "debug=fast", f"paths.data_dir={tmp_path / 'data'}"])
    datamodule = build(cfg.data, "data")
    assert datamodule.train_size == 64 and datamodule.val_size == 64

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    fake = types.SimpleNamespace(datasets=types.SimpleNamespace(CIFAR10=offline))
    monkeypatch.setitem(sys.modules, "torchvision", fake)
    monkeypatch.setattr("recipes.cifar10.import_torchvision", lambda: fake)
    with pytest.raises(RecipeError, match=r"CIFAR-10 could not be downloaded into .*URLError.*cifar-10-python.tar.gz"):
        datamodule.prepare_data()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_instantiates(experiment, tmp_path, monkeypatch):
    cfg = with_output_dir(compose_train([f"experiment={experiment}", *CPU_TRAINER]), tmp_path)
    datamodule = build(cfg.data, "data")
    assert isinstance(datamodule, L.LightningDataModule)
    trainer = build(cfg.trainer, "trainer", callbacks=build_callbacks(cfg, tmp_path), logger=False)
    assert isinstance(trainer, L.Trainer)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # the same outcome whether or not it is installed
    if experiment == "cifar10_ddp":
        with pytest.raises(RecipeError, match="pip install torchvision"):
            build(cfg.model, "model")
    else:
        assert build(cfg.model, "model")(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_experiment_values():
    overfit = compose_train(["experiment=digits_overfit"])
    assert overfit.data.train_size == 100 and overfit.trainer.max_epochs == 120 and overfit.optimizer.lr == 0.1
    cifar = compose_train(["experiment=cifar10_ddp"])
    assert cifar.data._target_ == "recipes.cifar10.CIFAR10DataModule"
    assert cifar.model.net._target_ == "recipes.models.resnet18" and cifar.model.net.image_shape == [3, 32, 32]
    assert cifar.trainer.strategy == "ddp" and cifar.trainer.accelerator == "gpu" and cifar.trainer.devices == 2
    assert cifar.monitor.max_overhead == 0.05 and cifar.cpu_threads is None
    sweep = compose_train(["experiment=lr_robustness"], hydra_cfg=True)
    assert sweep.hydra.mode.name == "MULTIRUN"
    params = sweep.hydra.sweeper.params
    assert params["optimizer.lr"] == "0.003,0.01,0.03,0.1,0.3,1.0,3.0"
    assert params["lr_policy"] == "stablelr,constant,exponential,cosine,plateau"
    assert sweep.monitor == {} and sweep.test is False


def test_slurm_launcher_follows_the_trainer():
    cfg = compose_train(["hydra/launcher=slurm", "trainer=multinode"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.tasks_per_node, launcher.nodes, launcher.gpus_per_node) == (4, 2, 4)
    assert cfg.trainer.num_nodes == 2 and cfg.trainer.devices == 4 and cfg.trainer.strategy == "ddp"
    resized = compose_train(["hydra/launcher=slurm", "trainer=multinode", "trainer.devices=8"], hydra_cfg=True)
    assert resized.hydra.launcher.tasks_per_node == 8
    expected = {
        "_target_", "submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb",
        "nodes", "name", "stderr_to_stdout", "partition", "qos", "comment", "constraint", "exclude", "gres",
        "cpus_per_gpu", "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s",
        "max_num_timeout", "additional_parameters", "array_parallelism", "setup",
    }  # fmt: skip
    assert set(launcher) == expected
    try:  # the plugin is in the `slurm` extra: where it is installed, the file must list exactly its fields
        from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    except ImportError:
        SlurmQueueConf = None
    if SlurmQueueConf is not None:
        assert set(OmegaConf.structured(SlurmQueueConf)) == expected


def test_callback_configs_name_real_arguments():
    from lightning_stablelr import StabilityMonitor, StableLR

    stablelr = set(inspect.signature(StableLR.__init__).parameters) - {"self"}
    assert set(compose_train().lr_policy.callback) - {"_target_"} <= stablelr
    monitor = set(inspect.signature(StabilityMonitor.__init__).parameters) - {"self"}
    for option in ("default", "full"):
        assert set(compose_train([f"monitor={option}"]).monitor) - {"_target_"} <= monitor


def test_every_policy_starts_from_the_optimizer_lr():
    for optimizer, lr, policies in (("sgd", 0.03, _options("lr_policy")), ("adamw", 0.001, ["stablelr", "plateau"])):
        for policy in policies:
            cfg = compose_train([f"optimizer={optimizer}", f"lr_policy={policy}"])
            assert "optimizer" not in cfg.model and "scheduler" not in cfg.model  # eval composes no optimizer
            assert build_model(cfg).optimizer_factory.keywords["lr"] == lr, (optimizer, policy)
            assert "lr" not in (cfg.lr_policy.scheduler or {}) and "lr" not in (cfg.lr_policy.callback or {})


def _peer_lrs(policy: str, epochs: int, val_losses: list[float] | None = None) -> list[float]:
    """The lr of each epoch under a peer policy's scheduler, stepped once per epoch as Lightning does."""
    cfg = compose_train([f"lr_policy={policy}", "trainer.max_epochs=10"])
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.lr_policy.scheduler)(optimizer=optimizer)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if val_losses is None:
            scheduler.step()
        else:
            scheduler.step(val_losses[epoch])
    return lrs


def test_peer_policies_follow_their_formulas():
    assert _peer_lrs("constant", 5) == [0.03] * 5
    assert _peer_lrs("exponential", 5) == pytest.approx([0.03 * 0.97**e for e in range(5)], rel=1e-12)
    cosine = [0.03 * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(11)]
    assert _peer_lrs("cosine", 11) == pytest.approx(cosine, rel=1e-9, abs=1e-15)
    # plateau: patience 3, factor 0.5; the best is at epoch 0, epochs 1..4 do not improve
    assert _peer_lrs("plateau", 6, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]) == [0.03, 0.03, 0.03, 0.03, 0.03, 0.015]
    cfg = compose_train(["lr_policy=plateau"])
    assert cfg.lr_policy.monitor == "val_loss" and cfg.lr_policy.monitor in LOGGED_METRICS


# ----------------------------------------------------------------------------------------------------------
# impossible combinations


def _error(overrides: list[str], tmp_path: Path) -> str:
    cfg = with_output_dir(compose_train(overrides), tmp_path)
    with pytest.raises(RecipeError) as caught:
        check_config(cfg)
    return " ".join(str(caught.value).split())


def test_gpu_trainers_without_a_gpu_point_to_the_cpu_options():
    for option in ("gpu", "ddp", "multinode"):
        with pytest.raises(RecipeError) as caught:
            check_devices(compose_train([f"trainer={option}"]).trainer, cuda_devices=0)
        message = " ".join(str(caught.value).split())
        assert "needs a CUDA GPU, but torch.cuda.is_available() is False" in message
        assert "trainer=cpu" in message and "trainer=ddp_cpu" in message and "trainer=ddp_sim" in message
    with pytest.raises(RecipeError, match=r"trainer.devices=4 asks for more GPUs than this machine has \(2\)"):
        check_devices(compose_train(["trainer=ddp", "trainer.devices=4"]).trainer, cuda_devices=2)
    check_devices(compose_train(["trainer=ddp"]).trainer, cuda_devices=2)  # enough GPUs: no error
    check_devices(compose_train(["trainer=ddp_cpu"]).trainer, cuda_devices=0)


def test_gpu_trainer_fails_in_check_config_on_a_machine_without_gpus(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "trainer.accelerator=gpu (strategy auto) needs a CUDA GPU" in _error(["trainer=gpu"], tmp_path)


def test_policy_and_optimizer_mismatches(tmp_path):
    assert _error(["lr_policy=cosine", "lr_policy.scheduler.eta_min=1.0"], tmp_path) == (
        "lr_policy=cosine anneals down to eta_min=1.0, which is not below optimizer.lr=0.03: the cosine policy "
        "would raise the lr instead of lowering it. Lower lr_policy.scheduler.eta_min (0 by default) or raise "
        "optimizer.lr."
    )
    assert _error(["lr_policy=plateau", "lr_policy.monitor=val_los"], tmp_path).startswith(
        "lr_policy=plateau (ReduceLROnPlateau) monitors 'val_los', which the model does not log. "
        "Set lr_policy.monitor to one of: val_loss, val_acc,"
    )
    assert "validation runs every 2 epoch(s), so the metric would be missing" in _error(
        ["lr_policy=plateau", "trainer.check_val_every_n_epoch=2"], tmp_path
    )
    assert _error(["optimizer.momentum=0", "optimizer.nesterov=true"], tmp_path) == (
        "optimizer (SGD) rejected its configuration: Nesterov momentum requires a momentum and zero dampening. "
        "Fix the optimizer.* values or choose another option of the optimizer group."
    )
    assert _error(["optimizer.lr=-1"], tmp_path) == (
        "optimizer.lr must be a finite number > 0, got -1. Set e.g. optimizer.lr=0.03."
    )
    cfg = with_output_dir(compose_train(), tmp_path)
    with open_dict(cfg):
        cfg.lr_policy.scheduler = compose_train(["lr_policy=exponential"]).lr_policy.scheduler
    with pytest.raises(RecipeError, match=r"sets both a callback \(StableLR\) and a scheduler \(ExponentialLR\)"):
        check_config(cfg)


def test_missing_values_are_listed_with_their_override(tmp_path):
    assert _error(["optimizer.lr=???", "data.batch_size=???"], tmp_path) == (
        "Missing required value(s): data.batch_size, optimizer.lr. These are marked `???` in the config and "
        "have no default; set them on the command line, e.g. `python -m recipes.train data.batch_size=<value> "
        "optimizer.lr=<value>`."
    )


def test_output_dir_outside_hydra_main_needs_an_override():
    with pytest.raises(RecipeError, match=r"When calling train\(cfg\) yourself, compose with the override "
                                          r"paths.output_dir=<directory>"):
        output_dir_of(compose_train())


def test_constructor_errors_name_the_nested_override(tmp_path):
    def message(overrides: list[str], node: str) -> str:
        cfg = with_output_dir(compose_train(overrides), tmp_path)
        with pytest.raises(RecipeError) as caught:
            build(OmegaConf.select(cfg, node), node)
        return " ".join(str(caught.value).split())

    assert message(["model.net.dropout=2"], "model") == (
        "`model.net` (recipes.models.MLP) rejected its configuration: `dropout` must be a finite number in "
        "[0, 1), got 2. Change it with `model.net.dropout=<value>`, or pick another option of the `model` group."
    )
    assert message(["data.train_size=1500"], "data").startswith(
        "`data` (recipes.data.DigitsDataModule) rejected its configuration: `train_size` + `val_size` must be at "
        "most 1796 (the digits have 1797 images and the test split needs one), got 1500 + 500."
    )
    assert message(["lr_policy.callback.decay_rate=-1"], "lr_policy.callback").startswith(
        "`lr_policy.callback` (lightning_stablelr.StableLR) rejected its configuration: `decay_rate`"
    )
    assert "Change it with `lr_policy.callback.decay_rate=<value>`" in message(
        ["lr_policy.callback.decay_rate=-1"], "lr_policy.callback"
    )
    assert "`monitor` (lightning_stablelr.StabilityMonitor) rejected its configuration: `max_overhead`" in message(
        ["monitor.max_overhead=0"], "monitor"
    )


def test_the_fsdp_recipe_refuses_a_tensor_parallel_mesh_and_follows_the_devices():
    # trainer=fsdp shards over data-parallel ranks only: a tensor-parallel dimension would leave its ranks
    # training unsynchronised copies, so Classifier.configure_model names the two settings to change.
    from torch import nn

    from recipes.classifier import Classifier

    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name):
            return self if name == "tensor_parallel" else None

        def size(self):
            return 2

    model = Classifier(nn.Linear(4, 3), num_classes=3)
    model._device_mesh = Mesh()
    with pytest.raises(ValueError, match=r"tensor_parallel_size=2: .*tensor_parallel_size=1 and .*data_parallel_size"):
        model.configure_model()
    strategy = compose_train(["trainer=fsdp", "trainer.devices=4"]).trainer.strategy
    assert (strategy.data_parallel_size, strategy.tensor_parallel_size) == (4, 1)
