"""Errors that reach the user as a one-line message instead of a traceback."""


class JaxserError(Exception):
    """A problem with the user's inputs, workdir or run that jaxser can name."""
