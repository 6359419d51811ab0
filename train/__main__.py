"""Command line: python -m train --config=configs/transformer.py[:variant] [--workdir=DIR].

Any config field can be overridden, e.g. --config.optimizer.learning_rate=3e-4. Bad input (an
unknown model, config field, variant or data set, a batch that does not divide over the devices)
ends with one line on stderr and exit status 2; --verbosity=1 also logs the traceback. A run
that diverges, or a checkpoint that fails to restore and shows no damage, ends with one line and
exit status 1.

For tests only: JAXMODELS_TEST_SIGNAL=SIGNAL@MOMENT:STEP makes the run send SIGNAL to itself, once,
at the first MOMENT at or after step STEP, so that a test stops, kills or pauses it at the same step
on a fast machine as on a slow one. MOMENT is `step` (after the call that ran the step: a SIGTERM
there stops the run after that step), `report` (after the step's report was written) or `save`
(after the step's async checkpoint save was started). Options after commas: `workdir=NAME` acts
only in a workdir named NAME (one trial of a sweep); `to=parent` sends SIGNAL to the parent process
instead (a sweep) and waits until a signal comes back (the sweep passing its stop on). Specs are
separated by `;`. Examples: SIGTERM@step:12, SIGKILL@save:20, SIGSTOP@report:10;SIGTERM@step:20,
SIGTERM@step:10,workdir=trial-002,to=parent.
"""

import codecs
import importlib.util
import logging as std_logging
import os
import pathlib
import select
import signal
import socket
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
TEST_SIGNAL = "JAXMODELS_TEST_SIGNAL"  # tests only: see the docstring
TEST_MOMENTS = ("step", "report", "save")  # the moments `loop.run_steps` calls `on_event` at


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


def test_signal_hook(text: str, workdir: str):
    """The `on_event` of `loop.train_and_evaluate` that $JAXMODELS_TEST_SIGNAL (`text`) asks for,
    or None (tests only; the grammar is in this module's docstring)."""
    hooks = [one_test_signal(spec, workdir) for spec in text.split(";") if spec.strip()]
    hooks = [hook for hook in hooks if hook is not None]
    if not hooks:
        return None

    def on_event(moment: str, step: int) -> None:
        for hook in hooks:
            hook(moment, step)

    return on_event


def one_test_signal(spec: str, workdir: str):
    """The hook of one SIGNAL@MOMENT:STEP[,workdir=NAME][,to=parent], or None if `workdir` is
    not NAME."""
    head, *options = spec.strip().split(",")
    name, _, at = head.partition("@")
    moment, _, step = at.rpartition(":")
    settings = dict(option.partition("=")[::2] for option in options)
    good = name in signal.Signals.__members__ and moment in TEST_MOMENTS and step.isdigit()
    good = good and set(settings) <= {"workdir", "to"} and settings.get("to", "parent") == "parent"
    if not good:
        raise ValueError(
            f"{TEST_SIGNAL}={spec!r} is not SIGNAL@MOMENT:STEP[,workdir=NAME][,to=parent] with "
            f"MOMENT one of {', '.join(TEST_MOMENTS)}; it is for tests only: unset it."
        )
    if "workdir" in settings and pathlib.Path(workdir).name != settings["workdir"]:
        return None
    signum, first_step, fired = signal.Signals[name], int(step), []

    def hook(at_moment: str, at_step: int) -> None:
        if fired or at_moment != moment or at_step < first_step:
            return
        fired.append(at_step)
        if settings.get("to") == "parent":
            relay_to_parent(signum)
        else:
            # raise(), unlike a kill of the whole process, is taken by this thread before it
            # returns, and Python runs the handler (the loop's stop request) right then.
            signal.raise_signal(signum)

    return hook


def relay_to_parent(signum: signal.Signals, safety_net_s: float = 600) -> None:
    """Sends `signum` to the parent process, then waits until this process gets a signal (the
    parent passing its stop on), which Python's wakeup fd reports from whichever thread took it."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno())
    try:
        os.kill(os.getppid(), signum)
        select.select([reader], [], [], safety_net_s)
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


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
        on_event = test_signal_hook(os.environ.get(TEST_SIGNAL, ""), workdir)
    except ValueError as error:
        fail(error)
    try:
        _, scalars = loop.train_and_evaluate(config, workdir, on_event=on_event)
    except INPUT_ERRORS as error:
        fail(error)
    except FloatingPointError as error:  # a diverged run: the last good checkpoint is kept
        fail(error, status=1)
    except checkpoint.RestoreError as error:  # not bad input: an I/O error, out of memory, ...
        fail(error, status=1)
    print(" ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
