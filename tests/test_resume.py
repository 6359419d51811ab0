"""Runs that survive: SIGTERM and resume, SIGKILL during a save, other device counts, damaged
checkpoints, non-finite losses. All on the real tiny MLP config and MNIST."""

import json
import logging
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from commands import start_train, xla_flags

from train import loop
from train.config import load_config
from train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 40
EPOCH_STEPS = 16  # train[:1024] at batch 64


def short_config():
    """The tiny MLP on 1024 images: 16 steps an epoch, a report every step, dropout on."""
    config = load_config(REPO / "configs" / "mlp.py:tiny")
    config.data.train_split = "train[:1024]"
    config.data.eval_split = "test[:256]"
    config.model.dropout_rate = 0.1  # resumed runs must draw the same dropout masks too
    config.train.num_steps = NUM_STEPS
    config.train.log_every = 1
    config.train.eval_every = 20
    config.train.checkpoint_every = 10
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: final parameters and every step's loss."""
    workdir = tmp_path_factory.mktemp("reference")
    state, _ = loop.train_and_evaluate(short_config(), workdir)
    return jax.device_get(state.params), read_metrics(workdir / "metrics.jsonl")


def assert_same_run(reference, params, reports):
    reference_params, reference_reports = reference
    chex.assert_trees_all_equal(reference_params, jax.device_get(params))
    assert [r["step"] for r in reports] == list(range(1, NUM_STEPS + 1))  # none doubled or lost
    for want, got in zip(reference_reports, reports, strict=True):
        assert want["train/loss"] == got["train/loss"], (want, got)


@pytest.mark.parametrize("stop_at", [5, EPOCH_STEPS, 23])  # mid-epoch, epoch end, second epoch
def test_sigterm_then_resume_is_bitwise_equal(stop_at, reference, tmp_path):
    def signal_at_stop(moment, step):  # after each call's steps, before the loop asks to stop
        if moment == "step" and step == stop_at:
            signal.raise_signal(signal.SIGTERM)  # a real signal, taken before this returns

    stopped, _ = loop.train_and_evaluate(short_config(), tmp_path, on_event=signal_at_stop)
    assert int(stopped.step) == stop_at
    assert str(stop_at) in {p.name for p in (tmp_path / "checkpoints").iterdir()}

    resumed, _ = loop.train_and_evaluate(short_config(), tmp_path)
    assert int(resumed.step) == NUM_STEPS
    assert_same_run(reference, resumed.params, read_metrics(tmp_path / "metrics.jsonl"))


def cli(workdir, *overrides, signal_at=None):
    """The command line on `workdir`; `signal_at` sets its test hook (`commands.start_train`)."""
    return start_train(
        "--config=configs/mlp.py:tiny", f"--workdir={workdir}",
        "--config.data.train_split=train[:1024]", "--config.data.eval_split=test[:256]",
        "--config.model.dropout_rate=0.1", f"--config.train.num_steps={NUM_STEPS}",
        "--config.train.log_every=1", "--config.train.eval_every=20",
        "--config.train.checkpoint_every=10", *overrides, signal_at=signal_at,
    )  # fmt: skip


def finish(process, returncode=0):
    """Waits for `process` to end (the timeout is only a safety net); returns its stderr."""
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == returncode, stderr[-2000:]
    return stderr


def test_sigterm_on_the_command_line_exits_0_and_the_same_command_resumes(reference, tmp_path):
    # The run sends itself SIGTERM after step 12: the command line's real signal path, at the
    # same step on a fast machine as on a slow one.
    stderr = finish(cli(tmp_path, signal_at="SIGTERM@step:12"))
    assert "Stopped by SIGTERM after step 12;" in stderr
    assert "12" in {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 13))

    stderr = finish(cli(tmp_path))
    assert "Resumed from checkpoint step 12" in stderr
    reports = read_metrics(tmp_path / "metrics.jsonl")
    state, _ = loop.train_and_evaluate(short_config(), tmp_path)  # finished: only restores
    assert_same_run(reference, state.params, reports)


def test_sigkill_during_an_async_save_resumes_from_the_previous_complete_step(reference, tmp_path):
    # The run SIGKILLs itself right after the async save of step 20 started: step 20's folder is
    # never completed, and the same command resumes from step 10 as if nothing had happened.
    finish(cli(tmp_path, signal_at="SIGKILL@save:20"), returncode=-signal.SIGKILL)
    names = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert {name for name in names if name.isdigit()} == {"10"}, names
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 21))

    stderr = finish(cli(tmp_path))
    assert "Resumed from checkpoint step 10" in stderr
    assert "Traceback" not in stderr
    reports = read_metrics(tmp_path / "metrics.jsonl")
    state, _ = loop.train_and_evaluate(short_config(), tmp_path)  # finished: only restores
    assert_same_run(reference, state.params, reports)


RESTORE_AND_DUMP = textwrap.dedent(
    """
    import sys, jax, numpy as np
    from train import loop
    from train.config import load_config
    sys.path.insert(0, "tests")
    from test_resume import short_config
    assert jax.device_count() == int(sys.argv[2]), jax.devices()
    state, _ = loop.train_and_evaluate(short_config(), sys.argv[1])
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    np.savez(sys.argv[3], **{jax.tree_util.keystr(p): x for p, x in leaves})
    """
)


def run_with_devices(num_devices, workdir, dump):
    env = dict(os.environ, XLA_FLAGS=xla_flags(num_devices))
    result = subprocess.run(
        [sys.executable, "-c", RESTORE_AND_DUMP, str(workdir), str(num_devices), str(dump)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(dump) as saved:
        return dict(saved)


def flat_params(params):
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def test_checkpoint_moves_between_4_devices_and_1(tmp_path):
    assert jax.device_count() == 4
    # Saved on 4 devices (this process), restored on 1.
    state, _ = loop.train_and_evaluate(short_config(), tmp_path / "four")
    on_one = run_with_devices(1, tmp_path / "four", tmp_path / "one.npz")
    chex.assert_trees_all_equal(flat_params(state.params), on_one)
    # Saved on 1 device (a subprocess trains there), restored on 4.
    trained_on_one = run_with_devices(1, tmp_path / "one", tmp_path / "trained.npz")
    restored, _ = loop.train_and_evaluate(short_config(), tmp_path / "one")
    chex.assert_trees_all_equal(trained_on_one, flat_params(restored.params))


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path):
    loop.train_and_evaluate(short_config(), tmp_path)
    wider = short_config()
    wider.model.hidden_sizes = (64,)
    with pytest.raises(ValueError, match="holds another model") as error:
        loop.train_and_evaluate(wider, tmp_path)
    assert "\n" not in str(error.value)
    assert str(NUM_STEPS) in {p.name for p in (tmp_path / "checkpoints").iterdir()}


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = short_config()
    config.optimizer.learning_rate = 1e30  # step 1 has rate 0 (warmup); then it blows up
    config.optimizer.warmup_steps = 40
    config.optimizer.kwargs.momentum = 0.0
    config.train.checkpoint_every = 2
    config.train.log_every = 2
    with pytest.raises(FloatingPointError, match=r"train/loss is nan in steps \d+-\d+") as error:
        loop.train_and_evaluate(config, tmp_path)
    first_bad = int(str(error.value).split("in steps ")[1].split("-")[0])
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] == first_bad - 1  # every step before the bad window is kept
    reports = read_metrics(tmp_path / "metrics.jsonl")
    assert all(np.isfinite(r["train/loss"]) for r in reports)
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 1e30


def test_only_the_newest_checkpoint_keep_steps_stay(tmp_path):
    config = short_config()
    config.train.log_every = 10
    config.train.checkpoint_every = 5
    config.train.checkpoint_keep = 2
    loop.train_and_evaluate(config, tmp_path)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [NUM_STEPS - 5, NUM_STEPS]


def test_checkpoint_of_another_optimizer_is_refused_and_kept(tmp_path):
    loop.train_and_evaluate(short_config(), tmp_path)  # SGD with momentum: one trace per param
    adam = short_config()
    adam.optimizer.name = "adam"  # a count and two moments per param
    with pytest.raises(ValueError, match="holds another optimizer's state: opt_state entry") as e:
        loop.train_and_evaluate(adam, tmp_path)
    assert "\n" not in str(e.value)
    # The first entry that differs: Adam's step count, which SGD's state does not have.
    assert "opt_state entry 0/count is absent there and shaped () in this config" in str(e.value)
    assert str(NUM_STEPS) in {p.name for p in (tmp_path / "checkpoints").iterdir()}


def test_adamw_run_resumes_bitwise(tmp_path, caplog):
    # optax's AdamW state (with its weight-decay mask) goes through the checkpoint's layout check
    # and back.
    def adamw_config(num_steps):
        config = short_config()
        config.optimizer.update(name="adamw", learning_rate=1e-3, weight_decay=0.01)
        config.optimizer.update(grad_clip_norm=1.0, schedule="constant", warmup_steps=5)
        config.train.num_steps = num_steps  # constant after warmup: the same rates either way
        return config

    whole, _ = loop.train_and_evaluate(adamw_config(20), tmp_path / "whole")
    caplog.set_level(logging.INFO)
    loop.train_and_evaluate(adamw_config(10), tmp_path / "halves")
    halves, _ = loop.train_and_evaluate(adamw_config(20), tmp_path / "halves")
    assert any("Resumed from checkpoint step 10" in r.getMessage() for r in caplog.records)
    counts = [leaf for leaf in jax.tree.leaves(halves.opt_state) if jnp.ndim(leaf) == 0]
    assert counts and {int(count) for count in counts} == {20}  # Adam's and the schedule's
    chex.assert_trees_all_equal(jax.device_get(halves.params), jax.device_get(whole.params))
    chex.assert_trees_all_equal(jax.device_get(halves.opt_state), jax.device_get(whole.opt_state))
