"""Every kind of bad input on the command line: one line naming the problem and the fix, exit
status 2, and nothing written to the workdir."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = "--config=configs/mlp.py:tiny"

BAD_INPUT = {
    # name: (arguments, what the one error line must say)
    "unknown config field": (
        [TINY, "--config.optimizer.learning_rat=0.1"],
        "unknown config field 'learning_rat'. Did you mean \"learning_rate\"",
    ),
    "unknown model": (
        [TINY, "--config.model.name=resnet"],
        "Unknown model 'resnet'. Known: ['cnn', 'lstm', 'mlp', 'seq2seq', 'transformer']",
    ),
    "unknown model field": (
        ["--config=configs/cnn.py:tiny", "--config.model.hidden_sizes=(3,)"],
        "unknown config field 'hidden_sizes'",
    ),
    "wrong value type": (
        [TINY, "--config.train.num_steps=many"],
        "flag --config.train.num_steps=many: invalid literal for int()",
    ),
    "config file does not exist": (
        ["--config=configs/nope.py"],
        "No such file or directory: 'configs/nope.py'",
    ),
    "variant does not exist": (
        ["--config=configs/mlp.py:huge"],
        "Unknown variant 'huge' of configs/mlp.py. Known: default, tiny",
    ),
    "missing dataset": (
        [TINY, "--config.data.dataset=cifar10"],
        "Data set 'cifar10' is not prepared in data dir",
    ),
    "missing split": (
        [TINY, "--config.data.eval_split=valid"],
        "Split 'valid' of data set 'mnist'",
    ),
    "batch does not divide over devices": (
        [TINY, "--config.data.batch_size=66"],
        "data.batch_size=66 does not divide over 4 devices; set --config.data.batch_size to a "
        "multiple of 4.",
    ),
    "model does not fit the data": (
        [TINY, "--config.model.num_classes=5"],
        "mnist has 10 classes, but the model's logits have shape (1, 5)",
    ),
    "unknown optimizer": (
        [TINY, "--config.optimizer.name=adamm"],
        "Unknown optimizer.name 'adamm': not an optax optimizer; use one such as 'sgd', 'adam',",
    ),
    "unknown parallelism": (
        [TINY, "--config.train.parallelism=tpu"],
        "Unknown train.parallelism 'tpu'; use 'jit' or 'pmap'.",
    ),
    "steps per call not positive": (
        [TINY, "--config.train.steps_per_call=0"],
        "train.steps_per_call must be an integer >= 1, got 0.",
    ),
    "evaluation interval not positive": (
        [TINY, "--config.train.eval_every=0"],
        "train.eval_every must be an integer >= 1 (steps between evaluations; the last step "
        "always evaluates), got 0; set --config.train.eval_every.",
    ),
    "no steps to train": (
        [TINY, "--config.train.num_steps=-3"],
        "train.num_steps must be an integer >= 1 (steps to train), got -3;",
    ),
    "negative CPU device count": (
        [TINY, "--config.train.cpu_devices=-1"],
        "train.cpu_devices=-1 must be an integer >= 0 (0 keeps JAX's default of one CPU device).",
    ),
    "workdir holds another model": (
        [TINY],
        "holds a run of model 'cnn', not 'mlp'; pass a different --workdir.",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_one_line_and_status_2(case, tmp_path):
    arguments, message = BAD_INPUT[case]
    workdir = tmp_path / "run"
    if case == "workdir holds another model":
        workdir.mkdir()
        (workdir / "config.json").write_text(json.dumps({"model": {"name": "cnn"}}))
    before = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else None

    result = subprocess.run(
        [sys.executable, "-m", "train", f"--workdir={workdir}", *arguments],
        cwd=REPO,
        env=dict(os.environ),  # conftest's 4 CPU devices included
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    after = sorted(p.name for p in workdir.iterdir()) if workdir.exists() else None
    assert after == before  # bad input writes nothing
