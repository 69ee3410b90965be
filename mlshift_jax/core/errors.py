"""The one exception family users see: what was expected, and what was found."""


class MlshiftError(Exception):
    """Base of every error mlshift_jax raises on purpose; the CLI prints it in one line."""


class DataError(MlshiftError):
    """A dataset file is missing, malformed, truncated or fails its checksum."""


class ConfigError(MlshiftError):
    """A parameter or configuration value is out of its allowed range."""
