"""One contract for every stage and CLI: what a user can cause ends in ONE line on stderr and exit status 2.

    if __name__ == "__main__":
        sys.exit(run_cli(main, "train"))

A user error (a bad setting, a bad input file, a missing output of an earlier stage) is a UserError, or
a subclass of it (ConfigError, EvalError, MergeError, WeightsError, BadRecordError, FieldError, ...); its
message names the setting, or the file, line and field. Anything else is a bug of ours and keeps its
traceback, so that it can be reported and fixed.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

USER_ERROR_STATUS = 2


class UserError(Exception):
    """Something the user can fix: reported as one line naming the setting or file, line and field."""


def one_line(err: BaseException) -> str:
    """The message of `err` on one line (a message of several lines would read as several errors)."""
    text = str(err).strip() or type(err).__name__
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def run_cli(main: Callable[[list[str] | None], object], prog: str, argv: list[str] | None = None,
            user_errors: Sequence[type[BaseException]] = ()) -> int:
    """Run main(argv) and return the process exit status: main's own int status, else 0; a UserError
    (or one of `user_errors`: exceptions a stage's library raises for bad input that are not yet
    UserErrors, e.g. FileNotFoundError for a missing input file) prints `prog: error: MESSAGE` on stderr
    and returns 2. argparse's usage errors already exit 2 with their own line."""
    try:
        status = main(argv)
    except (UserError, *user_errors) as err:
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR_STATUS
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
