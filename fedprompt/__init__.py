"""fedprompt: privacy-preserving federated prompt tuning of frozen causal language models."""

__version__ = "0.1.0"
