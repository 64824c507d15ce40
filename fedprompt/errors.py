"""Errors a user can cause. The CLI prints them in one line without a traceback and exits with the error's
``exit_code``; the aggregation server answers with its ``status`` (a gRPC status code's name). Any other exception
is a bug: the CLI lets its traceback show, the server answers UNKNOWN."""


class FedPromptError(Exception):
    """Base class of every error fedprompt raises on purpose for bad input or state."""

    status = "INVALID_ARGUMENT"  # the gRPC status the aggregation server answers with
    exit_code = 2  # what the CLI exits with


class ConfigError(FedPromptError, ValueError):
    """A setting a user gave is out of range or does not fit the others (a ValueError too, for callers that
    validate without caring whose error it is)."""


class DatasetError(FedPromptError):
    """A dataset file or name is unusable (missing columns, empty, unknown labels, unreadable)."""


class ModelError(FedPromptError):
    """A model name, folder or download is unusable."""


class ArtifactError(FedPromptError):
    """A prompt artifact is malformed or does not fit the base model it is loaded onto."""


class BudgetExceededError(FedPromptError):
    """A job would spend more privacy budget than the data holder has left."""
