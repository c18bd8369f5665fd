"""User-facing errors: one line naming what is wrong and how to fix it."""


class GreenoptError(Exception):
    """An error caused by input or environment; the CLI prints its message alone and exits 1."""


class ConfigError(GreenoptError):
    """A recipe, variant, protocol or scheme failed validation."""


class MeterError(GreenoptError):
    """An energy meter is unavailable or unreadable (permissions, missing driver)."""


class ModelError(GreenoptError):
    """A model could not be found or loaded."""


class MoveError(GreenoptError):
    """A compression step cannot be applied as configured (checked before any work)."""


class WriteError(GreenoptError, OSError):
    """A failed write: one line naming the path, the reason and the fix (a GreenoptError, so the
    CLI prints it alone), and still an OSError with the original ``errno`` for callers that catch one."""
