"""Errors a user can act on. Each message says what was wrong and what to do; the command-line
entry points print it as one line on stderr and exit non-zero (a traceback with --verbose)."""


class SncaError(Exception):
  """Base class: an error whose message is meant for the user."""


class ConfigError(SncaError, ValueError):
  """A config value that cannot work."""


class DataError(SncaError):
  """A dataset that cannot be found or read, or data that contradicts the config."""


class CheckpointError(SncaError):
  """A checkpoint that is missing, unreadable, or does not match the config."""


class TrainingError(SncaError):
  """Training cannot go on (e.g. a non-finite loss)."""


class Interrupted(SncaError):
  """SIGTERM / SIGINT at a point where stopping at once loses nothing."""
