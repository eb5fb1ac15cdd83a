"""Deprecated name of `cvvae.finetune` (output-layer tuning moved there); it will be removed."""

import warnings

from ..finetune import *  # noqa: F403 - the old names, re-exported
from ..finetune import __all__  # noqa: F401

warnings.warn("cvvae.pipelines.tune moved to cvvae.finetune", DeprecationWarning, stacklevel=2)
