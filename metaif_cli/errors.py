"""User-facing errors.

A :class:`MetaifError` is a user mistake or a missing resource (wrong config value,
missing dataset, incomplete run directory). The command layer prints its message as
one line, without a traceback, and exits with status 2. Its message must say what to fix.
"""


class MetaifError(Exception):
    """An error the user can fix; the message says how."""
