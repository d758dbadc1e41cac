"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """A problem with the user's input (path, shape, option) that they can fix.

    The message names the problem and, where possible, the fix. The CLI prints it without a traceback.
    """
