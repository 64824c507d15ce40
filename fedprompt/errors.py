"""Errors a user can cause. The CLI prints them without a traceback and exits non-zero."""


class FedPromptError(Exception):
    """Base class of every error fedprompt raises on purpose for bad input or state."""


class DatasetError(FedPromptError):
    """A dataset file or name is unusable (missing columns, empty, unknown labels, unreadable)."""


class ModelError(FedPromptError):
    """A model name, folder or download is unusable."""


class ArtifactError(FedPromptError):
    """A prompt artifact is malformed or does not fit the base model it is loaded onto."""


class BudgetExceededError(FedPromptError):
    """A job would spend more privacy budget than the data holder has left."""
