"""User-facing errors: one line, shown without a traceback, non-zero exit."""


class SpecliError(Exception):
    """An error whose message is meant for the user as it is."""
