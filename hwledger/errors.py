"""Errors a user can act on. The CLI prints them without a traceback."""


class UserError(Exception):
    """A mistake in input or environment that the user can fix; the message says how."""

    exit_code = 2
