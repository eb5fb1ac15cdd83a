"""cvvae: CV-VAE, a video VAE whose latents stay compatible with Stable Diffusion's image VAE."""

from .errors import CheckpointError, ConfigError, CVVAEError, InputError

__version__ = "0.1.0"
__all__ = ["CVVAE", "CVVAEError", "CheckpointError", "ConfigError", "InputError", "__version__"]


def __getattr__(name: str):
    # The model pulls in diffusers (seconds to import); `cvvae.io` and `cvvae --help` should not wait for it.
    if name == "CVVAE":
        from .model import CVVAE

        return CVVAE
    raise AttributeError(f"module 'cvvae' has no attribute {name!r}")
