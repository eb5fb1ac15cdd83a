"""Errors a user can cause. Each message says what went wrong and what to do about it."""


class CVVAEError(Exception):
    """Base class of every error cvvae raises because of user input."""


class CheckpointError(CVVAEError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class ConfigError(CVVAEError):
    """A model config asks for something this implementation cannot build."""


class InputError(CVVAEError):
    """A tensor, file or argument has the wrong shape, type or content."""
