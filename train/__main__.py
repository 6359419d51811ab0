"""Command line: python -m train --config=configs/transformer.py[:variant] [--workdir=DIR].

Any config field can be overridden, e.g. --config.optimizer.learning_rate=3e-4. Bad input (an
unknown model, config field, variant or data set, a batch that does not divide over the devices)
ends with one line on stderr and exit status 2; --verbosity=1 also logs the traceback. A run
that diverges, or a checkpoint that fails to restore and shows no damage, ends with one line and
exit status 1.
"""

import codecs
import importlib.util
import logging as std_logging
import os
import pathlib
import sys
import threading

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: configs/cnn.py:tiny", lock_config=True
)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config>[-<variant>]).")
flags.DEFINE_string(
    "coordinator_address", None, "Multi-process runs: HOST:PORT of process 0, the same everywhere."
)
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this process, 0..num_processes-1.")
flags.DEFINE_integer(
    "startup_timeout", 300, "Seconds to wait for every process to join a multi-process run."
)
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS

# What bad input raises: the model table, the data pipeline and the loop's own checks. (Config
# files and overrides are checked while flags are parsed, in `parse_flags`.)
INPUT_ERRORS = (KeyError, TypeError, ValueError, FileNotFoundError)


def one_line(error: BaseException) -> str:
    """The message of `error` on one line.

    ml_collections wraps errors in config files in a message that holds their whole traceback (keep
    its last line).
    """
    text = str(error.args[0]) if error.args else type(error).__name__
    if "Traceback (most recent call last)" in text or "Failed loading config file" in text:
        text = text.strip().splitlines()[-1]
    return " ".join(text.split())


def fail(error: BaseException, status: int = 2) -> None:
    """Ends the program with `error` on one line of stderr (status 2: bad input)."""
    logging.debug("Traceback of the error below:", exc_info=error)
    print(f"error: {one_line(error)}", file=sys.stderr)
    sys.exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, but bad flags or configs end with one line and status 2."""
    try:
        return FLAGS(argv)
    except AttributeError as error:
        # An override of a field the config lacks. ml_collections gives the repr of a KeyError's
        # message, with a "Did you mean" line when a field is close: undo the repr.
        text = str(error.args[0]) if error.args else ""
        if text[:1] in "'\"" and text[-1:] == text[:1]:
            text = codecs.decode(text[1:-1], "unicode_escape")
        text = ". ".join(line.strip() for line in text.splitlines() if line.strip())
        fail(AttributeError(f"unknown config field {text}"))
    except (*INPUT_ERRORS, OSError, flags.Error) as error:
        fail(error)


def default_workdir(config_arg: str) -> str:
    """runs/cnn for configs/cnn.py, runs/cnn-tiny for configs/cnn.py:tiny."""
    path, _, variant = config_arg.partition(":")
    name = pathlib.Path(path).stem
    return str(pathlib.Path("runs") / (f"{name}-{variant}" if variant else name))


class _QuietLibraries(std_logging.Filter):
    """Drops INFO lines of orbax (dozens per checkpoint) and tfds; their warnings still show."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno >= std_logging.WARNING:
            return True
        return not any(name in record.pathname for name in ("orbax", "tensorflow_datasets"))


def start_distributed() -> None:
    """Joins a multi-process run: from the flags, or, on a TPU pod slice, by JAX's own discovery.

    Must run before JAX touches a device. A process that cannot gather all the others within
    --startup_timeout seconds fails with one line saying which, and exit status 2."""
    import jax

    explicit = (FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    if all(value is None for value in explicit):
        # A TPU pod slice lists its hosts; JAX finds the coordinator and its own id there.
        if "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
            jax.distributed.initialize(initialization_timeout=FLAGS.startup_timeout)
        return
    if any(value is None for value in explicit):
        raise ValueError(
            "Multi-process runs need all of --coordinator_address, --num_processes and "
            "--process_id."
        )
    # JAX aborts the whole process (a C++ fatal error) when peers do not show up in time, so a
    # watchdog of our own fires first and says who is missing, in one line.
    count, me = FLAGS.num_processes, FLAGS.process_id
    who = "the other processes" if me == 0 else "process 0 (the coordinator)"
    watchdog = threading.Timer(
        FLAGS.startup_timeout,
        lambda: (
            print(
                f"error: process {me} of {count} could not reach {who} at "
                f"{FLAGS.coordinator_address} within {FLAGS.startup_timeout} s; start all "
                f"{count} processes with the same --coordinator_address and --num_processes, "
                f"ids 0..{count - 1}.",
                file=sys.stderr,
                flush=True,
            ),
            os._exit(2),
        ),
    )
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=FLAGS.coordinator_address,
            num_processes=count,
            process_id=me,
            initialization_timeout=FLAGS.startup_timeout + 30,  # the watchdog speaks first
        )
    finally:
        watchdog.cancel()


def restart_with(environ: dict[str, str] | None) -> None:
    """Replaces this process by the same command line in environment `environ` (None: goes on).

    glibc reads its malloc settings and JAX its CPU device count only when a process starts
    (`train.process`), so the command line starts itself once more, before it imports JAX, with
    them set. If the restart fails, the run goes on without them.
    """
    if environ is None:
        return
    changed = sorted(name for name, value in environ.items() if os.environ.get(name) != value)
    logging.info("Restarting once with %s set (train/process.py).", ", ".join(changed))
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError as error:
        logging.warning("Could not restart (%s); going on without those settings.", error)


def main(argv):
    del argv
    logging.get_absl_handler().addFilter(_QuietLibraries())
    try:
        config = FLAGS.config
        config.to_dict()  # ml_collections loads the file lazily: make a missing one fail here
    except (*INPUT_ERRORS, OSError, flags.Error) as error:
        fail(error)
    from train import process  # no JAX yet: the train package does not import it

    try:
        restart_with(process.restart_environment(config.train))  # before JAX starts any thread
    except ValueError as error:
        fail(error)
    # TensorFlow is not needed, but if it is installed it must not take GPU memory from JAX.
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        tf.config.set_visible_devices([], "GPU")
    from train import checkpoint, loop  # imported after flag parsing: importing jax is slow

    process.set_compile_cache(config.train.compile_cache_dir)

    try:
        start_distributed()
    except ValueError as error:
        fail(error)
    workdir = FLAGS.workdir or default_workdir(config_flags.get_config_filename(FLAGS["config"]))
    logging.info("Workdir: %s", workdir)
    try:
        _, scalars = loop.train_and_evaluate(config, workdir)
    except INPUT_ERRORS as error:
        fail(error)
    except FloatingPointError as error:  # a diverged run: the last good checkpoint is kept
        fail(error, status=1)
    except checkpoint.RestoreError as error:  # not bad input: an I/O error, out of memory, ...
        fail(error, status=1)
    print(" ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
