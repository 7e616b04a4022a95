"""The errors a job ends with on purpose: one line for the user, never a traceback."""

__all__ = ["JobFailed", "UserError"]


class UserError(Exception):
    """A problem with the user's input or setup: printed as one line, exit status 2."""


class JobFailed(Exception):
    """A job stopped for a reason its message explains: one line, exit status 1."""
