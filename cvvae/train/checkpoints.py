"""Training checkpoints: the whole accelerate state (model, discriminator, optimizers, schedulers, EMA, RNG
states) per step, written under a temporary name and renamed once every rank is done; `--resume` continues from
the newest one, after checking that the run's settings still fit what the checkpoint holds.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ..errors import ConfigError
from ..io.files import atomic_dir
from .config import TrainConfig, build_config


def checkpoints(out: Path) -> list[Path]:
    found = [p for p in (out / "checkpoints").glob("step-*") if (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def save_checkpoint(accelerator, out: Path, step: int, keep: int) -> Path:
    """accelerate state into checkpoints/.step-N.partial, renamed to step-N once every rank is done."""
    final = out / "checkpoints" / f"step-{step}"
    tmp = out / "checkpoints" / f".step-{step}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def save_weights(model, out: Path) -> None:
    """save_pretrained into a temporary folder that replaces `out` when complete."""
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)


def check_resumable(saved: dict, cfg: TrainConfig) -> None:
    """The settings that decide what a checkpoint holds (which parameters the optimizers track, whether
    there is an EMA copy or a discriminator) must match the run's: else loading its state fails deep in torch."""
    def held(c: TrainConfig) -> dict:
        return {"freeze_encoder": c.freeze_encoder, "EMA": bool(c.ema_decay),
                "discriminator": c.has_discriminator and (c.disc_ndf, c.disc_layers)}

    before, after = held(build_config(TrainConfig, saved)), held(cfg)
    changed = [f"{k} was {before[k]} and is {after[k]}" for k in before if before[k] != after[k]]
    if changed:
        raise ConfigError(f"cannot --resume {cfg.output_dir}: {'; '.join(changed)} (its checkpoints hold a different "
                          "optimizer state); set it back, or train into a new output_dir with init=<its weights>")
