"""The one exception of bad input, below every other module (``config``, ``user_data`` and the
rest raise it; the CLI turns it into one line and exit status 2)."""


class ConfigError(ValueError):
    """A bad configuration value; the message is one line naming the field and what is allowed."""
