"""The one exception type for problems a user can cause and fix, and the exit status rule."""

from __future__ import annotations

EXIT_OK = 0
"""Everything asked for was done (cases skipped on request count as done)."""

EXIT_FAILED = 1
"""Some case failed for a reason that is not the user's input (a bug, out of memory, a disk error)."""

EXIT_USER = 2
"""A problem the user can fix: a bad flag, manifest, config value or input file, alone or in a batch."""


class UserError(Exception):
    """A bad file, manifest, config value or flag.

    The message names the file (or value) and the problem, and says what to do where that is
    not obvious. The command line prints it without a traceback and exits with status 2.
    """


def exit_status(user_problems: int = 0, other_failures: int = 0) -> int:
    """The exit status of any command, by the one rule every command follows.

    * 0: nothing failed;
    * 2: something the user can fix went wrong (a :class:`UserError`: a missing or unreadable
      input, a mask on the wrong grid, a bad flag), for one input or for any case of a batch;
    * 1: some case failed for another reason. It wins over 2, because fixing the inputs alone
      would not make the rerun succeed.

    A batch goes on past a failed case either way and reports each; the status sums them up.
    A :class:`UserError` raised outside a batch (a bad flag, an unusable manifest) is turned
    into status 2 by the command line itself.

    Args:
        user_problems: cases (or inputs) that failed with a user-fixable problem.
        other_failures: cases that failed for any other reason.

    Returns:
        ``EXIT_OK`` (0), ``EXIT_FAILED`` (1) or ``EXIT_USER`` (2).
    """
    if other_failures:
        return EXIT_FAILED
    if user_problems:
        return EXIT_USER
    return EXIT_OK
