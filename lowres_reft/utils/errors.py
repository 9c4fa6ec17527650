"""User-facing errors: the CLI prints their one-line message and exits with code 2, no traceback."""


class UserError(Exception):
    """Something the user can fix (bad recipe, missing file, ...). The message is one line."""


class ConfigError(UserError):
    """A recipe or override is invalid. The message names the file and the key."""


class UsageError(UserError):
    """A command was called wrongly (missing checkpoint, unknown dataset, ...)."""


def did_you_mean(name: str, choices) -> str:
    """' (did you mean "x"?)' for the closest of `choices` to a misspelled `name`, or "" when none is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


def first_line(err: BaseException) -> str:
    """The first non-blank line of an exception's message ("" when it has none): library errors can be long."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0] if lines else ""
