"""The one exception family users see: what was expected, and what was found."""


class MlshiftError(Exception):
    """Base of every error mlshift_jax raises on purpose; the CLI prints it in one line."""


class DataError(MlshiftError):
    """A dataset file is missing, malformed, truncated or fails its checksum."""


class ConfigError(MlshiftError):
    """A parameter or configuration value is out of its allowed range."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a bench run: `cached` cells of the selection have their record on disk
    (a KeyboardInterrupt, not an MlshiftError: the CLI exits 130, not 2)."""

    def __init__(self, cached: int, total: int):
        super().__init__(f"{cached} cells cached")
        self.cached, self.total = cached, total
