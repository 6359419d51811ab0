"""Small command lines after training (train.export, train.plot): argparse with one-line errors.

Imports nothing but the standard library, so `python -m train.plot` starts without JAX.
`train/serve.py` keeps its own copy of these lines: it imports nothing from `train`.
"""

import argparse
import sys


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with one line on stderr and exit status 2, as
    `python -m train` does (argparse itself prints the usage first). The description is shown as
    written: the module docstrings' tables stay tables."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        fail(message)


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
