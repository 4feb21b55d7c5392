"""Errors a user can fix. Each message names the problem and the fix."""

class UserError(Exception):
    """Bad input from the user: config, data, checkpoint or command line."""

class ConfigError(UserError):
    """The configuration is invalid."""

class DataError(UserError):
    """A data file is missing, malformed or does not fit the model."""

class CheckpointError(UserError):
    """A checkpoint cannot be loaded into this model or run."""
