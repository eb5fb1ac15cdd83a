"""The training configuration: dataclasses with the official names, read from YAML plus `key=value` overrides.

`load_config("configs/tiny.yaml", ["steps=100", "loss.mapping=slice"])` gives a `TrainConfig`; every key is
checked against the dataclasses (an unknown key or a value of the wrong type is a `ConfigError`, never ignored).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .losses import LossConfig


@dataclass
class DataConfig:
    videos: str | None = None  # folder, CSV/JSONL manifest, or webdataset shards ("data/shard-*.tar")
    images: str | None = None  # folder or manifest of images (trained as 1-frame videos)
    frames: int = 17
    stride: tuple[int, int] = (1, 8)
    short_side: int = 256
    crop: int = 256
    video_batch: int = 1
    image_batch: int = 8
    image_ratio: float = 0.5  # fraction of batches that are image batches
    num_workers: int = 2


@dataclass
class OptimConfig:
    lr: float = 4e-5  # official: base 2e-5 x lr_g_factor 2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 1000
    min_lr_ratio: float = 0.005
    grad_clip: float = 1.0
    disc_lr: float = 2e-5


@dataclass
class TrainConfig:
    output_dir: str = "runs/cvvae"
    image_vae: str | None = None  # frozen 2D VAE (diffusers AutoencoderKL folder) for regularisation/inflation
    init: str | None = None  # CV-VAE weights to start from; default: inflate `image_vae`
    model: dict = field(default_factory=dict)  # CVVAE config when neither init nor image_vae is given
    lpips_vgg16: str | None = None  # ImageNet VGG16 weights (torchvision file) for the perceptual loss
    steps: int = 200_000  # total optimisation steps (the LR schedule spans them)
    stop_at: int | None = None  # end this invocation after this step (checkpointed); --resume continues
    seed: int = 0
    # "no" (the paper trains in fp32) or "bf16"; an unquoted YAML `no` arrives as False and means "no"
    mixed_precision: str = field(default="no", metadata={"yaml_false": "no"})
    gradient_checkpointing: bool = True
    # Train the decoder only: the latent space, and so its compatibility with the image VAE, stays as it is
    # (how SD's ft-EMA/ft-MSE decoders were made). The decoder regulariser then has nothing to train: skipped
    # in training steps (evaluations without gradients still report it).
    freeze_encoder: bool = False
    ema_decay: float | None = None
    disc_ndf: int = 64
    disc_layers: int = 4
    log_every: int = 50
    image_every: int = 250
    save_every: int = 2000
    keep_checkpoints: int = 2
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    @property
    def has_discriminator(self) -> bool:
        """Whether the GAN term is on (then checkpoints hold a discriminator and its optimizer)."""
        return self.loss.disc_factor > 0 and self.loss.disc_weight > 0

    def __post_init__(self) -> None:
        if self.mixed_precision not in ("no", "bf16"):
            raise ConfigError(f"mixed_precision must be 'no' or 'bf16', got {self.mixed_precision!r}")


def _field_types(cls) -> dict[str, set[type]]:
    """Field name -> the plain types its annotation admits (`str | None` -> {str, NoneType})."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # X | None, Optional[X]
        args = typing.get_args(hint) if union else (hint,)
        out[name] = {typing.get_origin(a) or a for a in args}
    return out


def build_config(cls, values: dict, where: str = "config"):
    """An instance of dataclass `cls` from a dict of plain (YAML) values, checked field by field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"unknown {where} keys: {unknown}; known: {sorted(fields)}")
    kwargs, hints = {}, _field_types(cls)
    for name, value in values.items():
        sub = fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            value = build_config(sub, value, f"{where}.{name}" if where != "config" else name)
        kinds = hints[name]
        if isinstance(value, list) and tuple in kinds:
            value = tuple(value)
        elif str in kinds and isinstance(value, bool):
            # YAML 1.1 reads unquoted no/off/yes/on as booleans; a field may say what its False means
            if value is False and "yaml_false" in fields[name].metadata:
                value = fields[name].metadata["yaml_false"]
            else:
                raise ConfigError(f"{where}.{name} must be a string, got {value!r} (quote it)")
        elif isinstance(value, bool) and bool not in kinds and kinds & {int, float}:
            raise ConfigError(f"{where}.{name} must be a number, got {value!r}")
        elif float in kinds and isinstance(value, (str, int)) and not isinstance(value, bool):
            try:  # YAML 1.1 reads 1e-4 (no dot) as a string
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}.{name} must be a number, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """A YAML file plus `dotted.key=value` overrides (values parsed as YAML: 1e-4, true, [1, 8])."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from None
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        node = values
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(raw)
    return build_config(TrainConfig, values, "config")


