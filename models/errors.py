"""The one exception type users see.

Every stage raises `ShadowError` for bad input (a wrong path, flag or value) with a message that
names what was wrong and what was expected; the CLI prints it as a single line and exits non-zero.
It lives here, in the first stage, because every later stage imports `models`.
"""


class ShadowError(Exception):
    """A user-facing error: the message is one line and says what to fix."""
