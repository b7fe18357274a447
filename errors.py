"""
errors.py: the two exceptions a user of the programs may see, and run_main, the one place that turns them
into exit statuses. Every program's main() catches UserError (FileFormatError is one) and prints
`error: <message>`, one line, no traceback: exit status 2 when the command line itself is wrong
(argparse, a bad value, flags that cannot go together), 1 for any later failure. Anything else is a bug
and keeps its traceback.

Both are ValueErrors, so library callers that catch ValueError (bpe.py's documented error) catch these.
"""

import argparse
import sys


class UserError(ValueError):
    """Something the user can fix: a bad flag or path, an empty corpus, a model that does not fit."""


class FileFormatError(UserError):
    """A file that cannot be used as what it was given for: truncated, corrupt, of another format or
    version, or with fields this code does not support (a checkpoint, tokenizer.json, config.json...)."""


class UsageError(UserError):
    """A bad command line that only shows once a file is read (a --block-size beyond the model's context):
    reported like any other usage error, exit status 2, wherever it is found."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line raises UserError instead of printing the usage and
    exiting, so that main() reports it like any other usage error: `error: <message>`, exit status 2."""

    def error(self, message):
        raise UserError(message)


def run_main(parse, work, argv=None, prefix="error: ", on_error=None):
    """A program's exit status, the same rules for every program: parse(argv) -> args, then work(args).
    A UserError from parse, or a UsageError from work: `error: <message>` on stderr, 2. Any other
    UserError or OSError (a missing file, a full disk) from work: the same line, 1. Ctrl-C: 130. Output
    piped into a program that stops reading (`| head`): 0, quietly. Anything else is a bug and keeps its traceback. work's return value, if an
    int, is the status (0 otherwise).

    on_error(status, exception), if given, sees each failure first, with the status these rules give it
    (a bug: 1), inside the `except` clause (so traceback.format_exc() shows it). It returns True when it
    has reported the failure itself (run_main then prints and raises nothing, and returns the status),
    False for the rules above. A program that runs as one of several processes uses it to end them all:
    train.py under mpiexec reports the error once and aborts the whole job (on_error then never returns).
    train.py also prints a usage error on one rank only, and "interrupted" on a second Ctrl-C."""
    try:
        args = parse(argv)
    except UserError as e:
        if not (on_error and on_error(2, e)):
            print(f"{prefix}{e}", file=sys.stderr)
        return 2
    try:
        status = work(args)
    except BrokenPipeError as e:                        # e.g. piped into `head`
        if not (on_error and on_error(0, e)):
            sys.stderr.close()
        return 0
    except UsageError as e:
        if not (on_error and on_error(2, e)):
            print(f"{prefix}{e}", file=sys.stderr)
        return 2
    except (UserError, OSError) as e:
        if not (on_error and on_error(1, e)):
            print(f"{prefix}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        if not (on_error and on_error(130, e)):
            print(file=sys.stderr)
        return 130
    except BaseException as e:                          # a bug
        if not (on_error and on_error(1, e)):
            raise
        return 1
    return status if isinstance(status, int) else 0
