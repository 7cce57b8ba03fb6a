"""The few exception classes a user can meet.

Every message is one paragraph that names the bad value and what would be accepted; the CLI
prints it without a stack trace and exits with the class's ``exit_code``.
"""


class DyLoRAError(Exception):
    """Base class for user-facing errors."""

    exit_code = 1


class ConfigError(DyLoRAError, ValueError):
    """A bad option, flag value or configuration file."""

    exit_code = 2


class DataError(DyLoRAError, ValueError):
    """A dataset that cannot be found, parsed or used."""

    exit_code = 2


class CheckpointError(DyLoRAError):
    """A checkpoint that cannot be found, fetched, verified or used."""

    exit_code = 1
