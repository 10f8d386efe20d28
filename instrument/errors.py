"""Errors a user can fix: printed as one line by the command line, never as a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad path, wrong file, bad option); the message names it and the fix."""
