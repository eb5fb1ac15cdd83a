"""cvvae: CV-VAE, a video VAE whose latents stay compatible with Stable Diffusion's image VAE."""

from .errors import CheckpointError, ConfigError, CVVAEError, InputError
from .model import CVVAE

__version__ = "0.1.0"
__all__ = ["CVVAE", "CVVAEError", "CheckpointError", "ConfigError", "InputError", "__version__"]
