"""Errors the CLI turns into one-line messages. Importing this module loads nothing heavy."""


class ConfigError(ValueError):
    """A recipe that does not validate; the message names the key and the file."""
