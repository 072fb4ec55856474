"""The long-horizon panels (issue 8): data, network, batches and validation loss of each, all offline on CPU.

=================  ==========================================================================================
``lm``             char-level causal transformer LM (2 pre-LN blocks, d_model 64, 4 heads, context 64, batch
                   8) on the English text of CPython's ``pydoc_data.topics`` (stdlib, no download): the topics
                   joined in sorted order, the first 90% of the characters train, the last 10% validate. Val
                   loss: mean cross-entropy (nats/char) over 20 fixed held-out batches. AdamW, weight decay 0.1
                   (one param group). Batch 8 x 64 characters: 2,000 steps see about 2.4 passes of the text.
``cnn``            scikit-learn's bundled 8x8 digits: 1297 train / 500 val images (fixed permutation, seed 0),
                   a 3-conv CNN with BatchNorm, random ±1-pixel shifts as augmentation, batch 32. Val loss:
                   cross-entropy on the whole val split in eval mode. SGD + momentum 0.9, weight decay 5e-4.
``regression``     the seeded teacher of :func:`benchmarks.tasks.regression_splits` with 2000 train / 1000 val
                   points and noise 0.2 (best possible val MSE 0.04), MLP 16-128-128-1, batch 32: a benign run
                   where a constant lr trains fine. SGD + momentum 0.9, no weight decay.
=================  ==========================================================================================

Every panel takes 2,000 optimizer steps and evaluates every 200. Batches are drawn with a
``torch.Generator`` seeded by the run seed (the data split and the held-out batches never depend on it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PANELS", "Panel", "build_panel", "panel_fingerprint"]

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Panel:
    """One long-horizon panel.

    Attributes:
        name: key in results (``task`` field).
        optimizer: ``"adamw"`` or ``"sgd"`` (with momentum 0.9); ``weight_decay`` goes with it.
        make_model: ``() -> nn.Module`` (call after seeding).
        train_batch: ``(generator) -> (x, y)``: one training batch (augmented where the panel augments).
        loss: ``(model, batch) -> scalar`` training objective, also the StableLR probe's closure.
        val_loss: ``(model) -> float``: the held-out loss, called in eval mode under ``no_grad``.
        steps_per_epoch: training examples / batch size (StableLR's ``steps_per_epoch``).
        tensors: the fixed data, for :func:`panel_fingerprint`.
        settings: the sizes that decide a run besides the data (batch, network widths), part of the
            config fingerprint of :func:`benchmarks.long.run_config`.
        batchnorm: the network has BatchNorm (the probe restores its buffers; schedule-free recalibrates them).
    """

    name: str
    optimizer: str
    weight_decay: float
    make_model: Callable[[], nn.Module]
    train_batch: Callable[[torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]
    val_loss: Callable[[nn.Module], float]
    steps_per_epoch: int
    tensors: tuple[Tensor, ...]
    settings: Mapping[str, Any]
    batchnorm: bool = False


def _cross_entropy(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def _mse(model: nn.Module, batch: Batch) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


# ---------------------------------------------------------------------------------------------- (a) LM
class _Block(nn.Module):
    """Pre-LN transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (causal attention, GELU MLP)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(attn.transpose(1, 2).reshape(batch, length, width))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """Token + learned position embeddings, ``layers`` blocks, final LN, linear head: logits ``(B, T, vocab)``."""

    def __init__(self, vocab: int, context: int, width: int = 64, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed, self.position = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[_Block(width, heads) for _ in range(layers)])
        self.ln, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        return self.head(self.ln(self.blocks(self.embed(tokens) + self.position(positions))))


def _windows(text: Tensor, starts: Tensor, context: int) -> Batch:
    index = starts[:, None] + torch.arange(context + 1)
    chunk = text[index]
    return chunk[:, :-1], chunk[:, 1:]


def _lm_panel(context: int = 64, batch: int = 8, val_batches: int = 20, width: int = 64, layers: int = 2) -> Panel:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    alphabet = sorted(set(text))
    code = {char: i for i, char in enumerate(alphabet)}
    ids = torch.tensor([code[char] for char in text], dtype=torch.long)
    cut = int(0.9 * len(ids))
    train, val = ids[:cut], ids[cut:]
    held_out = torch.Generator().manual_seed(12345)
    val_starts = torch.randint(0, len(val) - context - 1, (val_batches, batch), generator=held_out)

    def train_batch(generator: torch.Generator) -> Batch:
        return _windows(train, torch.randint(0, len(train) - context - 1, (batch,), generator=generator), context)

    def val_loss(model: nn.Module) -> float:
        return sum(float(_cross_entropy(model, _windows(val, starts, context))) for starts in val_starts) / val_batches

    return Panel("lm", "adamw", 0.1, lambda: CharTransformer(len(alphabet), context, width, 4, layers), train_batch,
                 _cross_entropy, val_loss, steps_per_epoch=len(train) // (batch * context),
                 tensors=(train, val, val_starts),
                 settings={"batch": batch, "context": context, "width": width, "heads": 4, "layers": layers})


# ---------------------------------------------------------------------------------------------- (b) CNN
def _cnn() -> nn.Module:
    def conv(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*conv(1, 16), *conv(16, 32), nn.MaxPool2d(2), *conv(32, 64), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, 10))


def _shift(images: Tensor, generator: torch.Generator) -> Tensor:
    """Shift each ``(1, 8, 8)`` image by an independent offset in ``{-1, 0, 1}²`` (zero padding)."""
    count = len(images)
    padded = F.pad(images, (1, 1, 1, 1))[:, 0]
    dy, dx = torch.randint(0, 3, (2, count), generator=generator)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]
    return padded[torch.arange(count)[:, None, None], rows, cols][:, None]


def _cnn_panel(train_size: int = 1297, batch: int = 32) -> Panel:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    x_train, y_train = images[order[:train_size]], labels[order[:train_size]]
    x_val, y_val = images[order[train_size:]], labels[order[train_size:]]

    def train_batch(generator: torch.Generator) -> Batch:
        index = torch.randint(0, train_size, (batch,), generator=generator)
        return _shift(x_train[index], generator), y_train[index]

    return Panel("cnn", "sgd", 5e-4, _cnn, train_batch, _cross_entropy,
                 lambda model: float(_cross_entropy(model, (x_val, y_val))), steps_per_epoch=train_size // batch,
                 tensors=(x_train, y_train, x_val, y_val), settings={"batch": batch, "channels": (16, 32, 64)},
                 batchnorm=True)


# ---------------------------------------------------------------------------------------------- (c) regression
def _regression_panel(train_size: int = 2000, batch: int = 32) -> Panel:
    from benchmarks.tasks import regression_splits

    splits = regression_splits(train_size=train_size, val_size=1000, noise=0.2)
    (x_train, y_train), (x_val, y_val) = splits["train"], splits["val"]

    def make_model() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))

    def train_batch(generator: torch.Generator) -> Batch:
        index = torch.randint(0, train_size, (batch,), generator=generator)
        return x_train[index], y_train[index]

    return Panel("regression", "sgd", 0.0, make_model, train_batch, _mse,
                 lambda model: float(_mse(model, (x_val, y_val))), steps_per_epoch=train_size // batch,
                 tensors=(x_train, y_train, x_val, y_val), settings={"batch": batch, "hidden": (128, 128)})


PANELS = ("lm", "cnn", "regression")
_BUILDERS: dict[str, Callable[[], Panel]] = {"lm": _lm_panel, "cnn": _cnn_panel, "regression": _regression_panel}


@cache
def build_panel(name: str) -> Panel:
    """The panel ``name`` (one of :data:`PANELS`), built once per process."""
    if name not in _BUILDERS:
        raise ValueError(f"`panel` must be one of {', '.join(PANELS)}, got {name!r}.")
    return _BUILDERS[name]()


def panel_fingerprint(panel: Panel) -> str:
    """SHA-1 (12 hex digits) of the panel's fixed tensors: results made on other data never count as done."""
    digest = hashlib.sha1(panel.name.encode())
    for tensor in panel.tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


def describe(panel: Panel) -> dict[str, Any]:
    """Size facts for the report: parameter count and steps per epoch."""
    torch.manual_seed(0)
    params = sum(p.numel() for p in panel.make_model().parameters())
    return {"params": params, "steps_per_epoch": panel.steps_per_epoch}
