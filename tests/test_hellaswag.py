"""HellaSwag as llm.c scores it: the eval file (dev/data/hellaswag.py), the batches and the rule (llmpy/evals.py),
the score in the training loop (train_gpt2.py -h 1, on one process and over ranks) and on its own
(dev/eval/hellaswag.py).

llm.c's rule (its dev/data/hellaswag.py, and train_gpt2.cu with -h 1): the context's GPT-2 tokens, and each
completion the tokens of " " + ending; for each completion, the model reads context + completion and its loss of
predicting each completion token is averaged over the completion's tokens; the prediction is the completion of
lowest mean loss; the accuracy is the fraction predicted right.

The data are six hand-written examples in HellaSwag's jsonl format, contexts of 1 to 13 tokens and endings of 1 to
10. The model is GPT-2's random init at d2c64h4 (GPT-2's vocab, seed 4). Its mean losses all lie near ln(50257) =
10.8, yet within an example the best completion beats the next by at least 0.036 (measured), four orders of
magnitude above fp32 rounding, so every correct implementation picks the same completions. With these labels the
mean loss gets 3 of the 6 right and the summed loss 0 (it prefers the shortest completion): a rule that summed
instead of averaging, or that scored the wrong tokens, would show.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import train_gpt2
import train_gpt2_torch as ref
from llmpy import evals, formats
from llmpy.configs.gpt2 import config_from_descriptor, gpt2_init
from llmpy.formats import EvalExample
from llmpy.logger import Logger
from llmpy.tokenizer import gpt2_encoding
from test_distributed import launch

REPO = Path(__file__).resolve().parents[1]
CONFIG = config_from_descriptor("d2c64h4")
T = 20  # the longest example needs 9 + 9 + 1 = 19 (llm.c: context + completion < T)
EXAMPLES = [  # (ctx, endings, label)
    ("A man is sitting on a roof. He", ["is using wrap to wrap skis.", "is ripping level tiles off.",
                                        "is holding a rubik's cube.", "starts pulling up roofing on a roof."], 3),
    ("Bake", ["the cake.", "it", "a loaf of bread for forty minutes until golden.", "nothing."], 0),
    ("The dog ran to the park and", ["barked.", "played fetch with its owner for an hour.", "slept", "flew away."], 1),
    ("She opens the laptop, types her password and",
     ["logs in.", "eats it", "starts writing an email to her boss.", "cries."], 2),
    ("Kids", ["play.", "are building a sandcastle on the beach", "sing", "run around the yard chasing a ball"], 1),
    ("To change a tire, loosen the nuts, lift the car and",
     ["remove the wheel.", "sing a song.", "paint it", "drive away quickly."], 0),
]
RESULT = re.compile(r"^HellaSwag: (\d+)/(\d+) = ([\d.]+)$", re.M)


def run(script, *args, cwd=None):
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def assert_one_line_error(result, prog, message):
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory, tiktoken_file):
    """The jsonl, its eval file (written by dev/data/hellaswag.py), a model file and a training shard."""
    folder = tmp_path_factory.mktemp("hellaswag")
    paths = {name: folder / name for name in ("val.jsonl", "val.bin", "model.bin", "train.bin")}
    records = [{"ind": 100 + i, "ctx": ctx, "endings": endings, "label": label, "split": "val"}
               for i, (ctx, endings, label) in enumerate(EXAMPLES)]
    paths["val.jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    result = run("dev/data/hellaswag.py", "--input", paths["val.jsonl"], "-o", paths["val.bin"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith(f"wrote {paths['val.bin']}: 6 examples\n")
    formats.write_model(paths["model.bin"], CONFIG, gpt2_init(CONFIG, seed=4))
    # -x 0 trains nothing, but the trainer opens its loader, which needs a batch (B=24 at most here)
    formats.write_shard(paths["train.bin"], np.random.default_rng(0).integers(0, CONFIG.vocab_size, 24 * T + 1))
    return paths


@pytest.fixture(scope="module")
def tool(data):
    """dev/eval/hellaswag.py --verbose on the data: (accuracy line, {index: (label, prediction, 4 mean losses)})."""
    result = run("dev/eval/hellaswag.py", "-e", data["model.bin"], "-i", data["val.bin"], "-b", 8, "--verbose")
    assert result.returncode == 0, result.stderr
    examples = {}
    for line in result.stdout.splitlines():
        if line.startswith("example "):
            _, index, _, label, _, prediction, _, *losses = line.split()
            examples[int(index)] = (int(label), int(prediction), [float(x) for x in losses])
    return RESULT.search(result.stdout).group(0), examples


def test_the_eval_file_holds_the_tokens_of_the_context_and_of_space_plus_each_ending(data, tiktoken_file):
    encoding = gpt2_encoding(tiktoken_file)
    examples = formats.read_eval_file(data["val.bin"])
    assert len(examples) == len(EXAMPLES)
    for position, (ex, (ctx, endings, label)) in enumerate(zip(examples, EXAMPLES)):
        assert ex.index == position  # numbered by position, as llm.c's loader reads them (not by "ind")
        assert ex.label == label
        assert ex.context == encoding.encode(ctx)
        assert ex.completions == [encoding.encode(" " + ending) for ending in endings]
    assert {len(ex.context) for ex in examples} == {1, 2, 7, 9, 13}
    assert max(evals.length_needed(ex) for ex in examples) == 19


def test_each_completion_takes_a_row_after_the_context_and_only_its_tokens_are_scored():
    ex = EvalExample(index=0, label=1, context=[5, 6, 7], completions=[[8], [9, 10], [11, 12, 13], [14]])
    batch = next(evals.EvalLoader([ex], B=8, T=8).batches())
    assert batch.inputs.tolist()[:4] == [[5, 6, 7, 8, 0, 0, 0, 0], [5, 6, 7, 9, 10, 0, 0, 0],
                                         [5, 6, 7, 11, 12, 13, 0, 0], [5, 6, 7, 14, 0, 0, 0, 0]]
    # position t predicts inputs[t + 1]: the last context token (t = 2) predicts the first completion token
    assert batch.targets[2].tolist()[:5] == [6, 7, 11, 12, 13]
    assert batch.mask.astype(int).tolist()[:4] == [[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0],
                                                   [0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0]]
    assert not batch.mask[4:].any() and not batch.inputs[4:].any()  # B=8 holds 2 examples: the second slot is empty

    losses = np.arange(64, dtype=np.float32).reshape(8, 8)  # row r, position t: 8r + t
    mean = evals.mean_completion_losses(losses, batch)
    assert mean.tolist() == [[2.0, 10.5, 19.0, 26.0]]
    scores = evals.Scores.of(batch.examples, mean)
    assert scores.predictions.tolist() == [0] and scores.correct == 0
    tie = evals.Scores.of(batch.examples, np.array([[3.0, 2.0, 2.0, 4.0]]))
    assert tie.predictions.tolist() == [1] and tie.correct == 1  # the first of equal losses, as llm.c's strict <


def test_an_example_needs_one_position_to_spare_in_T():
    ex = EvalExample(index=0, label=0, context=[1, 2], completions=[[3], [4, 5, 6], [7], [8]])
    evals.EvalLoader([ex], B=4, T=6)
    with pytest.raises(ValueError, match=r"example 0 needs T >= 6 \(a context of 2 tokens and a completion of 3"):
        evals.EvalLoader([ex], B=4, T=5)  # llm.c asserts context + completion < T; we refuse before any forward
    with pytest.raises(ValueError, match="B=6 is not a multiple of 4"):
        evals.EvalLoader([ex], B=6, T=6)


@pytest.mark.parametrize("world_size, shares", [(1, [7]), (2, [4, 3]), (3, [3, 3, 1]), (8, [1] * 7 + [0])])
def test_ranks_take_consecutive_shares_of_ceil_n_over_world_size_examples(world_size, shares):
    examples = [EvalExample(index=i, label=0, context=[1], completions=[[2]] * 4) for i in range(7)]
    loaders = [evals.EvalLoader(examples, B=8, T=4, rank=r, world_size=world_size) for r in range(world_size)]
    assert [len(loader.examples) for loader in loaders] == shares
    assert [ex.index for loader in loaders for ex in loader.examples] == list(range(7))
    assert all(loader.num_examples == 7 for loader in loaders)


def llmc_rule_in_pytorch(model_path, encoding):
    """llm.c's dev/data/hellaswag.py evaluate() from the jsonl's text, on train_gpt2_torch.py's GPT: one row per
    completion, no batching or padding, F.cross_entropy at every position, the completion's positions averaged.
    Returns (mean losses (6, 4), predictions (6,))."""
    _, flat = formats.read_model(model_path)
    model = ref.model_from_flat(CONFIG, flat, flash=False)
    means = np.zeros((len(EXAMPLES), 4))
    for e, (ctx, endings, _) in enumerate(EXAMPLES):
        context = encoding.encode(ctx)
        for i, ending in enumerate(endings):
            tokens = torch.tensor([context + encoding.encode(" " + ending)])
            with torch.no_grad():
                logits, _ = model(tokens, tokens)  # with targets it returns every position's logits
            losses = F.cross_entropy(logits[0, :-1], tokens[0, 1:], reduction="none")  # position t predicts t + 1
            means[e, i] = losses[len(context) - 1:].mean().item()
    return means, means.argmin(axis=1)


def test_the_standalone_tool_scores_as_an_independent_pytorch_computation_of_llmcs_rule(data, tool, tiktoken_file):
    accuracy_line, examples = tool
    means, predictions = llmc_rule_in_pytorch(data["model.bin"], gpt2_encoding(tiktoken_file))
    ranked = np.sort(means, axis=1)
    assert (ranked[:, 1] - ranked[:, 0]).min() > 0.03  # the margins the module docstring relies on
    labels = np.array([label for _, _, label in EXAMPLES])
    assert (predictions == labels).sum() == 3

    assert sorted(examples) == list(range(6))
    for e, (label, prediction, losses) in examples.items():
        assert label == labels[e] and prediction == predictions[e]
        # fp32 forwards (NumPy's and torch's) that sum in different orders: ~1e-6 relative on a token's loss;
        # printed with 6 decimals (5e-8 relative at 10.8). Allowed 1e-5 relative, 300x below the 0.036 margin
        assert losses == pytest.approx(means[e].tolist(), rel=1e-5)
    assert accuracy_line == "HellaSwag: 3/6 = 0.500000"


def test_train_gpt2_h_1_scores_as_the_tool_on_one_process_and_on_two_ranks(data, tool, tmp_path):
    """-x 0 scores the -e model (llm.c's loop: HellaSwag at the last step). One process with B=24 (all six examples
    in one forward) and two gloo ranks with B=4 (an example a forward; rank 0 examples 0-2, rank 1 3-5): the same
    line in main.log, and the accuracy of the standalone tool's NumPy forward."""
    args = ["--device", "cpu", "--dtype", "float32", "-e", data["model.bin"], "-t", T, "-i", data["train.bin"],
            "-j", "", "-x", 0, "-s", 0, "-h", 1, "--hellaswag_file", data["val.bin"]]
    for processes, B in ((1, 24), (2, 4)):
        folder = tmp_path / f"run{processes}"
        folder.mkdir()
        results, _ = launch("plain" if processes == 1 else "tcp", processes,
                            [*args, "-b", B, "-o", folder / "log", "--dist_timeout", 60], folder)
        for code, out, err in results:
            assert code == 0, err
        out = results[0][1]
        assert f"HellaSwag: 6 examples of {data['val.bin']}, {B // 4} a forward" in out
        assert RESULT.search(out).group(0) == tool[0]
        assert (folder / "log" / "main.log").read_text() == "s:0 eval:0.5000\n"


def test_a_resumed_log_keeps_the_eval_lines_of_the_steps_before_the_checkpoint(tmp_path):
    lines = ["s:0 tel:10.1", "s:0 trl:10.2 lr:0.1 norm:1 ms:1 tok/s:1", "s:1 tel:9.1", "s:1 eval:0.2500",
             "s:1 trl:9.2 lr:0.1 norm:1 ms:1 tok/s:1", "s:2 tel:8.1", "s:2 eval:0.3000"]
    (tmp_path / "main.log").write_text("\n".join(lines) + "\n")
    logger = Logger(tmp_path, resume_step=2)  # the checkpoint of step 2: its validation and HellaSwag are redone
    logger.log_eval(2, 0.3)
    logger.close()
    assert (tmp_path / "main.log").read_text().splitlines() == lines[:5] + ["s:2 eval:0.3000"]


def test_h_1_is_llmcs_hellaswag_flag_and_h_alone_prints_the_help_as_help_does(capsys):
    assert train_gpt2.parse_args(["-h", "1"]).hellaswag == 1 and train_gpt2.parse_args([]).hellaswag == 0
    for argv in (["-h"], ["--help"], ["-b", "8", "-h", "-t", "64"]):
        with pytest.raises(SystemExit) as stopped:
            train_gpt2.parse_args(argv)
        assert stopped.value.code == 0
        help_text = capsys.readouterr().out
        assert help_text.startswith("usage: ") and "-h [0|1], --hellaswag [0|1]" in help_text


# (name, extra flags, what stderr's one line must say)
BAD_TRAINER_INPUTS = [
    ("no eval file", ["--hellaswag_file", "{tmp}/nope.bin"],
     r"--hellaswag_file .*nope\.bin: file not found: write it with python dev/data/hellaswag\.py"),
    ("B not a multiple of 4", ["-b", 6], r"-h 1 needs -b/--batch_size a multiple of 4 .*got 6"),
    ("an example longer than T", ["-t", 18], r"--hellaswag_file .*val\.bin: example 0 needs T >= 19 .* T is 18"),
    ("not an eval file", ["--hellaswag_file", "{train}"], r"train\.bin: bad magic 20240520, expected 20240522"),
]


@pytest.mark.parametrize("name, extra, message", BAD_TRAINER_INPUTS, ids=[b[0] for b in BAD_TRAINER_INPUTS])
def test_bad_hellaswag_input_to_the_trainer_is_one_line(data, tmp_path, name, extra, message):
    extra = [str(a).format(tmp=tmp_path, train=data["train.bin"]) for a in extra]
    result = run("train_gpt2.py", "--device", "cpu", "--dtype", "float32", "-e", data["model.bin"], "-b", 4, "-t", T,
                 "-i", data["train.bin"], "-j", "", "-x", 0, "-h", 1, "--hellaswag_file", data["val.bin"], *extra)
    assert_one_line_error(result, "train_gpt2.py", message)


# (name, the jsonl's lines, what stderr's one line must say)
GOOD = json.dumps({"ctx": "A", "endings": ["b", "c", "d", "e"], "label": 1})
BAD_JSONL = [
    ("a broken line", [GOOD, "", '{"ctx": "A", "endings"'], r"bad\.jsonl: line 3: invalid JSON"),
    ("label out of range", [GOOD, GOOD.replace('"label": 1', '"label": 4')],
     r"bad\.jsonl: line 2: label 4 out of range \[0, 4\)"),
    ("three endings", [GOOD.replace('"d", ', "")], r"bad\.jsonl: line 1: expected 'endings' to be a list of 4 strings"),
    ("no examples", [""], r"bad\.jsonl: holds no examples"),
]


@pytest.mark.usefixtures("tiktoken_file")
@pytest.mark.parametrize("name, lines, message", BAD_JSONL, ids=[b[0] for b in BAD_JSONL])
def test_a_bad_jsonl_is_one_line_and_writes_nothing(tmp_path, name, lines, message):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    result = run("dev/data/hellaswag.py", "--input", tmp_path / "bad.jsonl", "-o", tmp_path / "out.bin")
    assert_one_line_error(result, "hellaswag.py", message)
    assert not (tmp_path / "out.bin").exists()


@pytest.mark.usefixtures("tiktoken_file")
def test_a_missing_jsonl_is_one_line(tmp_path):
    result = run("dev/data/hellaswag.py", "--input", tmp_path / "nope.jsonl", "-o", tmp_path / "out.bin")
    assert_one_line_error(result, "hellaswag.py", r"nope\.jsonl: file not found")
