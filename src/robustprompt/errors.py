"""Errors that describe a user mistake. The CLI prints them without a traceback."""


class RobustPromptError(Exception):
    """Base class: bad input, bad configuration or bad data — something the user can fix."""


class ConfigError(RobustPromptError):
    """A configuration value is missing, of the wrong type, or out of range."""


class DatasetError(RobustPromptError):
    """A dataset on disk does not have the expected layout or content."""


class ModelError(RobustPromptError):
    """A backbone name, checkpoint or prompt setting cannot be used."""


class StorageError(RobustPromptError):
    """A result file cannot be written (disk full, permission denied, read-only file system).
    Files written before it stay complete: every write goes to a temporary file first."""
