"""train.keep_best: the parameters of the best evaluation are kept in WORKDIR/best, through a
stop and resume, and load back as train.trained.load(workdir, "best")."""

import os
import pathlib
import signal

import chex
import jax
import numpy as np
import pytest

from train import data, loop, trained
from train.config import load_config
from train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]


def config_with_best(metric: str = "eval/accuracy"):
    """The tiny MLP on a small MNIST slice, evaluated every 10 of 60 steps."""
    config = load_config(REPO / "configs" / "mlp.py:tiny")
    config.data.train_split = "train[:2048]"
    config.data.eval_split = "test[:256]"
    config.model.dropout_rate = 0.1
    config.optimizer.learning_rate = 0.05  # large enough that the evaluations go up and down
    config.train.update(num_steps=60, log_every=10, eval_every=10, checkpoint_every=30)
    config.train.keep_best = metric
    return config


def best_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "best").iterdir() if p.name.isdigit())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("best")
    loop.train_and_evaluate(config_with_best(), workdir)
    return workdir


def test_the_best_evaluation_is_kept_and_loads_back(uninterrupted):
    rows = [r for r in read_metrics(uninterrupted / "metrics.jsonl") if "eval/accuracy" in r]
    assert [r["step"] for r in rows] == [10, 20, 30, 40, 50, 60]
    (step,) = best_steps(uninterrupted)  # one step kept
    by_step = {r["step"]: r["eval/accuracy"] for r in rows}
    assert by_step[step] == max(by_step.values())
    best, newest = trained.load(uninterrupted, "best"), trained.load(uninterrupted)
    assert (best.step, newest.step) == (step, 60)
    # The kept parameters are that step's: evaluated again, they give its accuracy.
    config = config_with_best()
    logits_fn = jax.jit(lambda p, x: best.model.apply({"params": p}, x, train=False))
    correct = count = 0
    for batch in data.eval_batches(config.data):
        predicted = np.argmax(logits_fn(best.params, batch["inputs"]), axis=-1)
        correct += float(np.sum((predicted == batch["targets"]) * batch["weights"]))
        count += float(np.sum(batch["weights"]))
    assert correct / count == pytest.approx(by_step[step], abs=1e-6)


def test_a_stopped_and_resumed_run_keeps_the_same_best(uninterrupted, tmp_path, monkeypatch):
    add = loop.ReportWindow.add
    calls = []

    def signal_after_35(window, step_sums, num_steps):
        calls.append(num_steps)
        if sum(calls) == 35:
            os.kill(os.getpid(), signal.SIGTERM)
        return add(window, step_sums, num_steps)

    with monkeypatch.context() as patch:
        patch.setattr(loop.ReportWindow, "add", signal_after_35)
        stopped, _ = loop.train_and_evaluate(config_with_best(), tmp_path)
    assert int(stopped.step) == 35
    loop.train_and_evaluate(config_with_best(), tmp_path)
    assert best_steps(tmp_path) == best_steps(uninterrupted)
    chex.assert_trees_all_equal(
        trained.load(tmp_path, "best").params, trained.load(uninterrupted, "best").params
    )


def test_keep_best_names_an_evaluation_metric(tmp_path):
    config = config_with_best("accuracy")
    with pytest.raises(ValueError, match=r"train.keep_best must be an evaluation metric"):
        loop.train_and_evaluate(config, tmp_path / "a")
    config = config_with_best("eval/acc")
    with pytest.raises(ValueError, match=r"'eval/acc' is not an evaluation metric .*eval/loss"):
        loop.train_and_evaluate(config, tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == []


def test_without_keep_best_there_is_none_to_load(tmp_path):
    config = config_with_best("")
    config.train.num_steps = 10
    loop.train_and_evaluate(config, tmp_path)
    assert not (tmp_path / "best").exists()
    with pytest.raises(FileNotFoundError, match=r"No best checkpoint .*keep_best"):
        trained.load(tmp_path, "best")
