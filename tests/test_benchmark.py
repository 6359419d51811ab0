"""benchmarks/step_throughput.py: its JSON lines (both implementations), its hand FLOP counts and
pipeline mode; and benchmarks/compile_time.py's cold and cached compiles. Tiny runs, no timing
assertions."""

import importlib.util
import json
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import pytest

from train import process, state

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "step_throughput.py"
COMPILE_TIME = SCRIPT.with_name("compile_time.py")
KEYS = {
    "model",
    "implementation",
    "mode",
    "examples_per_s",
    "step_ms",
    "step_ms_min",
    "step_ms_max",
    "flops_per_step",
    "xla_flops_per_step",
    "peak_gflops",
    "share_of_peak",
    "compile_s",
    "loadavg",
    "other_cores_busy",
    "cpu",
    "devices",
    "jax_version",
}
# Tiny runs: a few steps, one small timed peak matmul after each repeat.
QUICK = ["--model=mlp", "--steps=5", "--repeats=2", "--peak_repeats=1", "--peak_size=256"]


def load_script(path: pathlib.Path):
    """The benchmark script at `path`, imported as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    return load_script(SCRIPT)


def printed_line(capsys) -> dict:
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_memory_mode_prints_all_keys_and_the_hand_flop_count(benchmark, capsys):
    results = benchmark.main([*QUICK, "--mode=memory"])  # both implementations: the MLP has one
    line = printed_line(capsys)
    assert results == [line]
    assert KEYS <= set(line), KEYS - set(line)
    assert (line["model"], line["implementation"], line["mode"]) == ("mlp", "standard", "memory")
    assert line["devices"] == 4  # conftest's device count wins over the config's
    # 784 -> 128 -> 10 at batch 128: forward 2 * B * (784 * 128 + 128 * 10), training 3x that.
    assert line["flops_per_step"] == 6 * 128 * (784 * 128 + 128 * 10) == 78_053_376
    # XLA counts the same matmuls less the first layer's unneeded input gradient, plus elementwise
    # work (and, on 4 devices, the gradient all-reduce): 2/3 of the hand count (52,360,704) and a
    # little more.
    assert 52_360_704 <= line["xla_flops_per_step"] < 1.1 * 52_360_704
    # A ratio of two timings: positive, bounded by the repeats below, never a fixed ceiling
    # (on a loaded machine the peak's matmul can run slower than the step's).
    assert line["share_of_peak"] > 0
    assert line["peak_gflops"] > 0 and line["compile_s"] > 0
    assert line["step_ms_min"] <= line["step_ms"] <= line["step_ms_max"]
    # One peak per repeat, each repeat's share against its own: the median share lies between
    # the slowest repeat over the fastest peak and the fastest repeat over the slowest peak.
    assert line["peak_gflops_min"] <= line["peak_gflops"] <= line["peak_gflops_max"]
    flops_per_ms = line["flops_per_step"] / 1e6  # GFLOP per step / ms = GFLOP/s
    lowest = flops_per_ms / line["step_ms_max"] / line["peak_gflops_max"]
    highest = flops_per_ms / line["step_ms_min"] / line["peak_gflops_min"]
    assert lowest * (1 - 1e-9) <= line["share_of_peak"] <= highest * (1 + 1e-9)
    assert line["share_of_peak_min"] <= line["share_of_peak"] <= line["share_of_peak_max"]
    assert line["examples_per_s"] == pytest.approx(128 / (line["step_ms"] / 1e3))
    # configs/mlp.py runs 25 steps per call, as the loop does: --steps=5 rounds up to one call.
    assert (line["steps_per_call"], line["steps"]) == (25, 25)


def test_pipeline_mode_compares_with_memory_throughput(benchmark, capsys):
    benchmark.main([*QUICK, "--mode=pipeline"])
    line = printed_line(capsys)
    assert KEYS <= set(line)
    assert (line["mode"], line["dataset"]) == ("pipeline", "mnist")
    assert line["share_of_memory_throughput"] > 0
    assert line["share_of_memory_throughput"] == pytest.approx(
        line["examples_per_s"] / line["memory_examples_per_s"]
    )


def test_all_runs_both_implementations_of_every_model_but_the_mlp(benchmark, monkeypatch, capsys):
    runs = []

    def run_fresh(name, script_and_args, stderr=None):
        runs.append((name, script_and_args))
        implementation = next(a for a in script_and_args if a.startswith("--implementation="))
        return {"model": name, "implementation": implementation.split("=")[1]}

    monkeypatch.setattr(benchmark, "run_fresh", run_fresh)
    results = benchmark.main(["--all", "--repeats=2"])
    assert [(r["model"], r["implementation"]) for r in results] == [
        ("mlp", "standard"),
        ("cnn", "standard"),
        ("cnn", "cpu"),
        ("lstm", "standard"),
        ("lstm", "cpu"),
        ("transformer_tiny", "standard"),
        ("transformer_tiny", "cpu"),
        ("transformer_small", "standard"),
        ("transformer_small", "cpu"),
    ]
    assert len(capsys.readouterr().out.strip().splitlines()) == 9  # one JSON line per run
    name, args = runs[2]  # every run is a fresh child process of one model and one form
    assert args[1:] == [f"--model={name}", "--implementation=cpu", "--mode=memory", "--repeats=2",
                        "--peak_repeats=2", "--peak_size=4096", "--child"]  # fmt: skip

    runs.clear()
    results = benchmark.main(["--model=mlp", "--implementation=cpu"])  # the MLP's one form
    assert [(r["model"], r["implementation"]) for r in results] == [("mlp", "standard")]


def test_each_run_starts_with_the_environment_of_the_command_line(benchmark, monkeypatch):
    seen = {}

    def run(command, env, **kwargs):
        seen.update(env)
        return subprocess.CompletedProcess(command, 0, stdout=b'{"model": "lstm"}\n')

    # Else the device count set in this environment (conftest's) wins, and nothing is set.
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("JAX_NUM_CPU_DEVICES", raising=False)
    monkeypatch.setattr(subprocess, "run", run)
    assert benchmark.run_fresh("lstm", ["script.py"]) == {"model": "lstm"}
    expected = process.environment(benchmark.benchmark_config("lstm").train)
    assert expected["JAX_NUM_CPU_DEVICES"] == "2"  # the LSTM benchmark: one device per core
    assert {name: seen[name] for name in expected} == expected


@pytest.mark.parametrize("implementation", ["standard", "cpu"])
def test_the_implementation_reaches_the_model_and_the_line(benchmark, implementation):
    config = benchmark.benchmark_config("cnn", implementation)
    assert benchmark.implementation_of(config) == implementation
    # Traced, not compiled: nn.Conv is a convolution, the tuned form one matmul over patches.
    model = state.build_model(config)
    images = jnp.zeros((2, 28, 28, 1))
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), images, train=False))
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, images, train=False))(params))
    assert ("conv_general_dilated" in jaxpr) == (implementation == "standard")
    # The MLP has one form, whatever is asked for.
    assert benchmark.implementation_of(benchmark.benchmark_config("mlp", implementation)) == (
        "standard"
    )


@pytest.mark.parametrize("name", ["cnn", "lstm", "transformer_tiny", "transformer_small"])
def test_hand_flop_counts_of_the_other_models(benchmark, name):
    config = benchmark.benchmark_config(name, pipeline=False)
    flops = benchmark.model_flops(config, benchmark.float_features(name, config))
    expected = {
        # 3x3 convs at 28x28 (1 -> 32) and 14x14 (32 -> 64), then 7*7*64 -> 128 -> 10.
        "cnn": 6 * 128 * (28 * 28 * 9 * 32 + 14 * 14 * 9 * 32 * 64 + 3136 * 128 + 128 * 10),
        # Gates of 3 layers over 100 steps (inputs 64, 128, 128; recurrent 128), head 128-64-10.
        "lstm": 6 * 64 * (100 * (64 + 128 + 128 + 3 * 128) * 512 + 128 * 64 + 64 * 10),
        # Per layer 12 W^2 per token (4 W^2 projections + 8 W^2 MLP) and 2 * T * W attention.
        "transformer_tiny": 6 * 12 * 64 * (4 * (12 * 128**2 + 2 * 64 * 128) + 128 * 65),
        "transformer_small": 6 * 16 * 256 * (6 * (12 * 384**2 + 2 * 256 * 384) + 384 * 65),
    }[name]
    assert flops == expected


@pytest.fixture(scope="module")
def compile_time():
    return load_script(COMPILE_TIME)


def test_compile_time_compiles_cold_then_loads_from_the_cache(compile_time):
    line = compile_time.cold_and_cached("mlp")  # two fresh processes over one new cache directory
    assert (line["cold_cache_hit"], line["cached_cache_hit"]) == (False, True)
    assert line["cache_files"] >= 1 and line["implementation"] == "cpu"
    for label in ("cold", "cached"):
        seconds = line[f"{label}_lower_s"] + line[f"{label}_compile_s"]
        assert line[f"{label}_first_step_compile_s"] == pytest.approx(seconds, abs=2e-3)


def test_compile_time_repeats_report_medians_and_every_run(compile_time, monkeypatch):
    def pair(seconds, hit):
        return {"model": "mlp", "implementation": "cpu", "cold_first_step_compile_s": seconds,
                "cached_first_step_compile_s": seconds / 4, "cached_cache_hit": hit,
                "cache_files": 5}  # fmt: skip

    pairs = iter([pair(4.0, True), pair(9.0, False), pair(5.0, True)])
    monkeypatch.setattr(compile_time, "cold_and_cached", lambda name, implementation: next(pairs))
    line = compile_time.repeated("mlp", 3)
    assert (line["model"], line["repeats"], line["implementation"]) == ("mlp", 3, "cpu")
    assert line["cold_first_step_compile_s"] == 5.0  # the median of 4, 9 and 5
    assert line["cold_first_step_compile_s_runs"] == [4.0, 9.0, 5.0]
    assert line["cached_first_step_compile_s"] == 1.25
    assert line["cached_cache_hit_runs"] == [True, False, True] and line["cache_files"] == 5
