"""Errors that are the user's to fix: a bad config value, a missing or corrupt input, a mismatched artifact.

Entry scripts (latentsim.cli.run) print them as `error: <message>` and exit 2, without a traceback; any other
exception is a bug and keeps its traceback. Each class also derives from the builtin a caller would expect
(ValueError, FileNotFoundError, RuntimeError), so `except ValueError` keeps working.
"""


class InputError(Exception):
    """Bad configuration or input; the message names the key, file or field and how to fix it."""


class ConfigError(InputError, ValueError):
    """A config value is wrong."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder a stage reads does not exist (usually: an earlier stage has not run)."""


class BadInputError(InputError, ValueError):
    """An input exists but does not fit: corrupt, of another format, SAE, hookpoint or prompt format."""


class UnavailableError(InputError, RuntimeError):
    """The config asks for something this machine lacks: a CUDA GPU, an optional extra such as vLLM."""
