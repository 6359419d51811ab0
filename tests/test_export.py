"""After training: loading a run back (train.trained), exporting it (train.export) and serving the
export with nothing but JAX and numpy (train.serve), on a tiny MLP and the tiny Transformer LM, each
trained a few steps once for the module."""

import json
import pathlib
import re
import subprocess
import sys

import chex
import jax
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from train import export, loop, serve, trained
from train.config import load_config
from train.state import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_STEPS = 10


def tiny_config(name: str, data_dir: str):
    """configs/<name>.py:tiny for NUM_STEPS steps, with checkpoints at steps 5 and 10."""
    config = load_config(REPO / "configs" / f"{name}.py:tiny")
    config.data.data_dir = data_dir
    config.train.num_steps = NUM_STEPS
    config.train.log_every = config.train.checkpoint_every = 5
    config.train.eval_every = NUM_STEPS
    config.train.sample_lines = 0  # no samples.txt: not needed here
    return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    """{name: (workdir, config, final params on the host)} of the tiny MLP and Transformer LM."""
    result = {}
    for name in ("mlp", "transformer"):
        workdir = tmp_path_factory.mktemp(name)
        config = tiny_config(name, data_dir)
        state, _ = loop.train_and_evaluate(config, workdir)
        result[name] = (workdir, config, jax.device_get(state.params))
    return result


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory):
    """{name: path of the .jaxexport} written by the command line's function."""
    paths = {}
    for name, (workdir, _, _) in runs.items():
        paths[name] = tmp_path_factory.mktemp("export") / f"{name}.jaxexport"
        export.main([f"--workdir={workdir}", f"--out={paths[name]}"])
    return paths


# --- train.trained --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_load_restores_the_final_parameters_and_the_config(name, runs):
    workdir, config, params = runs[name]
    run = trained.load(workdir)
    assert run.step == NUM_STEPS
    chex.assert_trees_all_equal(jax.device_get(run.params), params)  # exactly, leaf by leaf
    assert run.config.to_dict() == config.to_dict()  # the JSON's lists are tuples again
    assert run.model == build_model(config)
    assert run.info.is_language_model == (name == "transformer")


def test_load_takes_an_older_step(runs):
    workdir, _, final = runs["mlp"]
    older = jax.device_get(trained.load(workdir, step=5).params)
    assert jax.tree.structure(older) == jax.tree.structure(final)
    assert not np.array_equal(older["logits"]["kernel"], final["logits"]["kernel"])
    with pytest.raises(FileNotFoundError, match=r"No checkpoint step 7 in .*; it holds \[5, 10\]"):
        trained.load(workdir, step=7)


def test_load_refuses_a_workdir_without_config_or_checkpoint(runs, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        trained.load(tmp_path)
    (tmp_path / "config.json").write_text((runs["mlp"][0] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="No checkpoint in"):
        trained.load(tmp_path)


def test_load_refuses_a_checkpoint_of_another_model(runs, tmp_path):
    workdir = runs["mlp"][0]
    (tmp_path / "checkpoints").symlink_to(workdir / "checkpoints")
    fields = json.loads((workdir / "config.json").read_text())
    fields["model"]["hidden_sizes"] = [64]  # the checkpoint's layer has 128
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(
        ValueError, match=r"hidden_0/bias is \(128,\) there and \(64,\) in the model"
    ):
        trained.load(tmp_path)


# --- train.export and train.serve -----------------------------------------------------------------

# Runs in a fresh process: deserialises an export, runs it on every array of an .npz file and
# writes the outputs to another; prints which modules beyond JAX and numpy it imported.
SERVE_IN_FRESH_PROCESS = """
import json, sys
import numpy as np
from train import serve
exported, meta = serve.load(sys.argv[1])
inputs = np.load(sys.argv[2])
np.savez(sys.argv[3], **{key: serve.run(exported, inputs[key]) for key in inputs.files})
training_code = ("flax", "optax", "orbax", "jaxmodels", "tensorflow_datasets", "grain", "PIL")
print(json.dumps({
    "imported": sorted(
        m for m in sys.modules
        if m.split(".")[0] in training_code
        or (m.startswith("train.") and m not in ("train.serve", "train.cli"))  # cli: stdlib only
    ),
    "input_shape": str(exported.in_avals[0].shape),
}))
"""


def example_batches(name: str) -> dict[str, np.ndarray]:
    """Two batches of different sizes of model inputs."""
    rng = np.random.default_rng(0)
    if name == "mlp":
        return {f"b{n}": rng.uniform(size=(n, 28, 28, 1)).astype(np.float32) for n in (1, 5)}
    return {f"b{n}": rng.integers(0, 65, size=(n, 64), dtype=np.int32) for n in (1, 3)}


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_export_in_a_fresh_process_gives_the_in_process_outputs(
    name, runs, exports, run_python, tmp_path
):
    run = trained.load(runs[name][0])
    batches = example_batches(name)
    np.savez(tmp_path / "inputs.npz", **batches)
    paths = [str(exports[name]), str(tmp_path / "inputs.npz"), str(tmp_path / "out")]
    result = run_python(SERVE_IN_FRESH_PROCESS, *paths)
    assert result["imported"] == []  # the export runs without the model or training code
    assert result["input_shape"] == ("(batch, 28, 28, 1)" if name == "mlp" else "(batch, 64)")
    outputs = np.load(tmp_path / "out.npz")
    for key, inputs in batches.items():
        want = run.model.apply({"params": run.params}, inputs, train=False)
        classes = (len(inputs), 10) if name == "mlp" else (*inputs.shape, 65)
        assert outputs[key].shape == want.shape == classes
        np.testing.assert_allclose(outputs[key], want, rtol=1e-5, atol=1e-5)


def test_export_metadata_says_how_to_feed_the_model(exports):
    mlp = json.loads(exports["mlp"].with_suffix(".json").read_text())
    assert mlp["kind"] == "image_classifier" and mlp["model"] == "mlp"
    assert mlp["input"] == {"shape": [None, 28, 28, 1], "dtype": "float32", "pixel_scale": 1 / 255}
    assert mlp["output"]["shape"] == [None, 10] and mlp["step"] == NUM_STEPS
    assert mlp["labels"] == [str(digit) for digit in range(10)]
    lm = json.loads(exports["transformer"].with_suffix(".json").read_text())
    assert lm["kind"] == "language_model"
    assert lm["input"] == {"shape": [None, 64], "dtype": "int32"}
    assert lm["output"]["shape"] == [None, 64, 65]
    assert len(lm["vocab"]) == 65 and lm["vocab"][:2] == ["\n", " "] and not lm["word_level"]


def mnist_test_image(data_dir: str) -> tuple[np.ndarray, int]:
    """The first image of MNIST's test split (uint8 [28, 28]) and its label."""
    example = tfds.data_source("mnist", split="test[:1]", data_dir=data_dir, download=False)[0]
    return example["image"][..., 0], int(example["label"])


def test_serve_gives_the_digit_of_a_real_mnist_image(runs, exports, data_dir, tmp_path):
    pixels, label = mnist_test_image(data_dir)
    PIL.Image.fromarray(pixels).save(tmp_path / "digit.png")
    out = subprocess.run(
        [sys.executable, "-m", "train.serve", str(exports["mlp"]), f"--image={tmp_path}/digit.png"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    match = re.fullmatch(r"(\d) \((0\.\d{3}|1\.000)\)\n", out)
    assert match, out
    run = trained.load(runs["mlp"][0])
    images = pixels[None, :, :, None].astype(np.float32) * np.float32(1 / 255)  # as train.data
    logits = run.model.apply({"params": run.params}, images, train=False)  # [1, 10]
    assert int(match[1]) == int(np.argmax(logits))
    assert float(match[2]) == pytest.approx(float(jax.nn.softmax(logits)[0].max()), abs=6e-4)
    del label  # after 10 steps the MLP need not be right; the digit must be its own answer


def test_served_text_is_the_models_greedy_continuation(runs, exports, capsys):
    serve.main([str(exports["transformer"]), "--prompt=ROMEO:", "--length=20", "--temperature=0"])
    text = capsys.readouterr().out[:-1]  # print's newline
    # The reference: greedy decoding with the Flax model itself, one full zero-padded window a step.
    run = trained.load(runs["transformer"][0])
    tokens = list(run.info.encode("ROMEO:"))
    for _ in range(20):
        window = np.zeros((1, 64), np.int32)
        window[0, : len(tokens)] = tokens
        logits = run.model.apply({"params": run.params}, window, train=False)
        tokens.append(int(np.argmax(logits[0, len(tokens) - 1])))
    assert text == run.info.decode(tokens)
    assert text.startswith("ROMEO:") and len(text) == 26


def test_generation_slides_past_the_window_and_draws_with_a_seed(exports):
    exported, meta = serve.load(exports["transformer"])
    prompt = serve.encode_characters("ROMEO:", meta)
    draws = [serve.generate(exported, prompt, 62, temperature=1.0, seed=s) for s in (1, 1, 2)]
    assert draws[0] == draws[1] != draws[2]
    assert all(len(d) == 68 and d[:6] == prompt for d in draws)  # 68 tokens > the 64 of a window
    assert all(0 <= t < 65 for t in draws[0])


def test_text_inputs_tokenise_as_in_training():
    meta = {
        "input": {"shape": [None, 5], "dtype": "int32"},
        "vocab": ["<pad>", "<unk>", "a", "good", "film", "."],
        "pad_id": 0,
        "unk_id": 1,
    }
    np.testing.assert_array_equal(serve.text_inputs("A GOOD film", meta), [[2, 3, 4, 0, 0]])
    np.testing.assert_array_equal(
        serve.text_inputs("a truly good film . a b", meta),
        [[2, 1, 3, 4, 5]],  # cut at 5 words
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["{lm}", "--image=x.png"], "holds a language model; use --prompt."),
        (["{mlp}", "--image={tmp}/small.npy"], r"The image is \(3, 3, 1\); this model takes"),
        (["{mlp}", "--image={tmp}/none.png"], "--image=.*none.png does not exist."),
        (["{lm}", "--prompt=ROMEO€"], r"Characters \['€'\] are not in the model's 65-char"),
        (["{tmp}/none.jaxexport", "--text=hi"], "none.jaxexport does not exist"),
        (["{lm}"], "one of the arguments --image --text --prompt is required"),
    ],
)
def test_serve_bad_input_is_one_line_and_status_2(args, message, exports, tmp_path, capsys):
    np.save(tmp_path / "small.npy", np.zeros((3, 3), np.uint8))
    paths = {"lm": exports["transformer"], "mlp": exports["mlp"], "tmp": tmp_path}
    with pytest.raises(SystemExit) as exit_info:
        serve.main([arg.format(**paths) for arg in args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(f"error: .*{message}", err), err


def test_export_bad_input_is_one_line_and_status_2(runs, tmp_path, capsys):
    for args, message in [
        ([f"--workdir={tmp_path}"], "config.json does not exist"),
        ([f"--workdir={runs['mlp'][0]}", "--step=3"], r"No checkpoint step 3 in .*\[5, 10\]"),
        ([f"--workdir={runs['mlp'][0]}", "--platforms=gpu"], "use some of cpu, cuda, rocm, tpu"),
        ([f"--workdir={runs['mlp'][0]}", f"--out={tmp_path}/m.json"], "would be overwritten"),
        ([], "the following arguments are required: --workdir"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            export.main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and re.match(f"error: .*{message}", err), err
    assert not (tmp_path / "m.json").exists()
