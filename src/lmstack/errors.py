"""One exception family: the CLI prints `error: <message>` for these and exits non-zero."""


class LmstackError(Exception):
    """Base of every error lmstack raises on purpose; the message names the problem and the fix."""

    exit_code = 2


class InputError(LmstackError):
    """Bad user input: a missing, empty, binary or non-UTF-8 file, or an invalid option value."""


class FormatError(LmstackError):
    """A file lmstack should read (tokenizer, ARPA, config, checkpoint) is malformed or corrupt."""


class CheckpointError(FormatError):
    """A checkpoint directory is incomplete, corrupt or of the wrong family."""


class ContextLengthError(InputError):
    """A sequence is longer than the model's context window."""


class ConfigError(InputError, ValueError):
    """A model or objective config holds an invalid value (a ValueError too, for code that caught
    the ValueError these configs raised before)."""


class DivergenceError(LmstackError):
    """Training stopped: the loss became NaN or infinite."""
