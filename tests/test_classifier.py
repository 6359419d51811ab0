"""The Transformer encoder classifier config (configs/transformer_classifier.py) on SST-2: its tiny
variant trained from the command line, on the slice of SST-2 that travels with the repository."""

import json
import math
import os
import pathlib
import subprocess
import sys

from train.config import load_config
from train.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = "configs/transformer_classifier.py"


def test_default_config_is_a_padding_masked_encoder_classifier():
    config = load_config(REPO / CONFIG)
    assert (config.model.name, config.model.causal, config.model.num_classes) == (
        "transformer",
        False,
        2,
    )
    assert config.data.dataset == "glue/sst2" and config.data.eval_split == "validation"
    assert config.model.max_len >= config.data.seq_len
    assert config.model.vocab_size >= config.data.vocab_size
    assert (config.optimizer.name, config.optimizer.weight_decay) == ("adamw", 0.1)


def test_tiny_config_trains_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "train", f"--config={CONFIG}:tiny", f"--workdir={tmp_path}"],
        cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    reports = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in reports] == [50, 100, 150, 200]
    for report in reports:
        assert all(math.isfinite(v) for v in report.values()), report
    evals = [r for r in reports if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [100, 200]
    # 0.726 here; a constant answer gets 0.509 (the positive share of validation).
    assert 0.6 < evals[-1]["eval/accuracy"] <= 1.0
    assert reports[-1]["train/loss"] < reports[0]["train/loss"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["model"]["causal"], saved["model"]["num_classes"]) == (False, 2)
    assert "eval/accuracy=" in result.stdout
