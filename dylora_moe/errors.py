"""The few exception classes a user can meet, and the exit statuses they end a command with.

Every message is one paragraph that names the bad value and what would be accepted; the CLI
prints it without a stack trace and exits with the class's ``exit_code``.
"""

EXIT_ERROR = 1  # any other user-facing error
EXIT_BAD_INPUT = 2  # configuration, data, checkpoint reference, fingerprint mismatch
EXIT_UNPUBLISHED = 3  # training finished, but some checkpoints never reached the store (local copies kept)
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT; continue with --resume auto

# The epilog of every command's --help.
TRAINING_EXIT_STATUS_HELP = f"""\
exit status: 0 success, {EXIT_ERROR} error, {EXIT_BAD_INPUT} bad input (configuration, data, checkpoint reference,
fingerprint mismatch), {EXIT_UNPUBLISHED} training finished but some checkpoints were not published to the store
(local copies kept; rerun with --resume auto to publish them), {EXIT_PREEMPTED} stopped by SIGTERM/SIGINT (after a
durable checkpoint once training has started; continue with --resume auto)."""
# the epilog of every other command: only training publishes checkpoints and promises a 75
EXIT_STATUS_HELP = f"""\
exit status: 0 success, {EXIT_ERROR} error, {EXIT_BAD_INPUT} bad input (an option, a model or checkpoint reference,
a file)."""


class DyLoRAError(Exception):
    """Base class for user-facing errors."""

    exit_code = EXIT_ERROR


class ConfigError(DyLoRAError, ValueError):
    """A bad option, flag value or configuration file."""

    exit_code = EXIT_BAD_INPUT


class InvalidOption(ConfigError):
    """A bad value of one named option. Its message spells the option as a keyword (``lora_r=0``);
    :meth:`as_flag` spells it as the command line does (``--lora_r 0``), with the same reason."""

    def __init__(self, option: str, value: object, reason: str):
        self.option, self.value, self.reason = option, value, reason
        super().__init__(f"{option}={value!r} is invalid: {reason}")

    def __reduce__(self):  # pickled whole (a rank's error reaches the others)
        return type(self), (self.option, self.value, self.reason)

    def as_flag(self) -> ConfigError:
        return ConfigError(f"--{self.option} {self.value!r} is invalid: {self.reason}")


class DataError(DyLoRAError, ValueError):
    """A dataset that cannot be found, parsed or used."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(DyLoRAError):
    """A checkpoint that cannot be found, fetched, verified or used."""

    exit_code = EXIT_ERROR


class UnpublishedCheckpoints(DyLoRAError):
    """The run finished but the store did not confirm every checkpoint; exit status 3."""

    exit_code = EXIT_UNPUBLISHED


class Preempted(DyLoRAError):
    """Stopped by a signal; whatever could be saved was. The CLI exits with EXIT_PREEMPTED."""

    exit_code = EXIT_PREEMPTED
