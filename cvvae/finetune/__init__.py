"""Output-layer tuning of video diffusion UNets on CV-VAE latents (the paper's Tables 3 and 5).

Modules: `objectives` (each UNet family's training loss), `layers` (which layers train; saving and loading
them), `tune` (the loop, `tune_unet`, and loaders for UNets, schedulers and contexts).
"""

from .layers import LAYERS, TunedLayersError, load_tuned_layers, save_tuned_layers, trainable_layers
from .objectives import FAMILIES, SUPPORTED, SVDOptions, TuneError, diffusion_loss, edm_loss
from .tune import load_scheduler, load_unet, read_context, tune_unet

__all__ = ["FAMILIES", "LAYERS", "SUPPORTED", "SVDOptions", "TuneError", "TunedLayersError", "diffusion_loss",
           "edm_loss", "load_scheduler", "load_tuned_layers", "load_unet", "read_context", "save_tuned_layers",
           "trainable_layers", "tune_unet"]
