"""What every command line of train/ shares: argparse with one-line errors, and `--step` values.

Imports nothing but the standard library, so `python -m train.plot` starts without JAX and
`python -m train.serve` runs an export with JAX and numpy alone.
"""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with one line on stderr and exit status 2, as
    `python -m train` does (argparse itself prints the usage first), the usage in brackets at its
    end where one is given (`usage=`). The description is shown as written: the module
    docstrings' tables stay tables."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        fail(f"{message} ({self.format_usage().strip()})" if self.usage else message)


def fail(error: BaseException | str, status: int = 2):
    """Ends the program with `error` on one line of stderr (status 2: bad input)."""
    text = error if isinstance(error, str) else (str(error.args[0]) if error.args else repr(error))
    print(f"error: {' '.join(text.split())}", file=sys.stderr)
    sys.exit(status)


def checkpoint_step(text: str) -> int | str:
    """A `--step` value: a checkpoint's step number, or "best" (a run with train.keep_best)."""
    if text == "best":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a step number nor 'best'") from None
