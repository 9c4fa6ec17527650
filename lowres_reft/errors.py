"""User-facing errors: the CLI prints their one-line message and exits with code 2, no traceback."""


class UserError(Exception):
    """Something the user can fix (bad recipe, missing file, ...). The message is one line."""


class ConfigError(UserError):
    """A recipe or override is invalid. The message names the file and the key."""


class UsageError(UserError):
    """A command was called wrongly (missing checkpoint, unknown dataset, ...)."""
