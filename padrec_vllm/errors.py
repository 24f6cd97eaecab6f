"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """A problem the user can fix (bad argument, missing or corrupt file). Never a bug."""
