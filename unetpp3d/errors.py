"""The one exception type for problems a user can cause and fix."""


class UserError(Exception):
    """A bad file, manifest, config value or flag.

    The message names the file (or value) and the problem, and says what to do where that is
    not obvious. The command line prints it without a traceback and exits with status 2.
    """
