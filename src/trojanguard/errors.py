"""User-facing errors. The CLI prints ``UserError`` as one line and exits 2."""


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""
