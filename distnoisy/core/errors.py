"""Errors that carry a message meant for the user: what is wrong and how to fix it."""


class DistnoisyError(Exception):
    """Base class. Its message is printed as one line by the command-line entry points."""


class ConfigError(DistnoisyError, ValueError):
    """A configuration value or key is invalid (raised before any training starts)."""


class DataError(DistnoisyError, ValueError):
    """Input data (shards, label files, images) is missing or malformed."""
