"""Metric sums on device, averages at report time, and the writers: metrics.jsonl + TensorBoard."""

import json
import math
import pathlib
from typing import Any

import jax
from tensorboardX import SummaryWriter

Metrics = dict[str, Any]


@jax.jit
def _add(total: Metrics, sums: Metrics) -> Metrics:
    return jax.tree.map(lambda a, b: a + b, total, sums)


def accumulate(total: Metrics | None, sums: Metrics) -> Metrics:
    """Adds metric sums elementwise; stays on device (no host sync).

    One compiled call per step rather than one dispatch per metric: 14 us against 45 us of host
    time for the three sums on this CPU, which a sub-millisecond train step notices.
    """
    if total is None:
        return sums
    return _add(total, sums)


def summarize(sums: Metrics, prefix: str) -> dict[str, float]:
    """Pulls sums to the host once and returns averages: `{prefix}/loss`, `{prefix}/accuracy`."""
    host = jax.device_get(sums)
    count = max(float(host["count"]), 1e-12)
    return {
        f"{prefix}/loss": float(host["loss_sum"]) / count,
        f"{prefix}/accuracy": float(host["correct_sum"]) / count,
    }


def check_finite(scalars: dict[str, float], first_step: int, last_step: int) -> None:
    """Raises FloatingPointError naming the metric and step window if any value is NaN or inf."""
    for name, value in scalars.items():
        if not math.isfinite(value):
            raise FloatingPointError(
                f"{name} is {value} in steps {first_step}-{last_step}; lower "
                "optimizer.learning_rate or set optimizer.grad_clip_norm, then resume."
            )


class MetricWriter:
    """Appends one JSON line per report to `metrics.jsonl` and mirrors scalars to TensorBoard.

    Only process 0 should create one. On resume, lines past the restored step are dropped, since
    those steps are about to run again.
    """

    def __init__(self, workdir: pathlib.Path, resume_step: int):
        self.path = workdir / "metrics.jsonl"
        truncate_after(self.path, resume_step)
        self._file = self.path.open("a")
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, **scalars}) + "\n")
        self._file.flush()
        for name, value in scalars.items():
            self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        self._file.close()
        self._tensorboard.close()


def truncate_after(path: pathlib.Path, step: int) -> None:
    """Drops the lines of a metrics.jsonl whose step is greater than `step`."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: pathlib.Path | str) -> list[dict[str, float]]:
    """The reports of a metrics.jsonl, in order."""
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
