"""Errors that medfed raises for bad input.

Every error says what was wrong (naming the file, column, site or parameter) and what is
allowed, so the command line can print it as one line and exit non-zero without a
traceback. Library users catch :class:`MedfedError`.
"""


class MedfedError(Exception):
    """Base class of every error medfed raises on purpose."""


class DataError(MedfedError):
    """A data file, column, site or label is not usable as given."""


class ConfigError(MedfedError):
    """A configuration value or command-line option is not allowed."""
