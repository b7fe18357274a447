"""
errors.py: the two exceptions a user of the programs may see. Every program's main() catches UserError
(FileFormatError is one) and prints `error: <message>`, one line, no traceback: exit status 2 when the
command line itself is wrong (argparse, a bad value, flags that cannot go together), 1 for any later
failure. Anything else is a bug and keeps its traceback.

Both are ValueErrors, so library callers that catch ValueError (bpe.py's documented error) catch these.
"""

import argparse


class UserError(ValueError):
    """Something the user can fix: a bad flag or path, an empty corpus, a model that does not fit."""


class FileFormatError(UserError):
    """A file that cannot be used as what it was given for: truncated, corrupt, of another format or
    version, or with fields this code does not support (a checkpoint, tokenizer.json, config.json...)."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, except that a bad command line raises UserError instead of printing the usage and
    exiting, so that main() reports it like any other usage error: `error: <message>`, exit status 2."""

    def error(self, message):
        raise UserError(message)
