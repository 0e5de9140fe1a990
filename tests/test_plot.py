"""dev/plot.py, the plot of training runs' main.log files, and llmpy.logger.read_main_log, the one parser of main.log.

- Two real runs, of train_gpt2.py and of the PyTorch reference (the tiny model of test_train_gpt2.py, on the
  CPU): the figure's train loss, val loss, learning rate, grad norm and tok/s lines hold exactly the values each
  run's main.log has (both write it through llmpy.logger), a smoothed train loss
  beside the raw one, one colour and one legend entry per run named by its folder; the command writes a PNG that
  decodes, and prints each run's best val loss. dev/compare_logs.py reads the same logs through the same parser.
- A log as llm.c writes it, resumed: llm.c appends from the checkpoint's step, so the steps the killed run logged
  past its checkpoint are dropped, a step logged twice keeps its last value, a half-written last line is left out;
  its HellaSwag accuracy (`s:STEP eval:ACC`) gets a panel, drawn only when some run has it.
- Steps skipped by the outlier guard are marked on the train loss.
- The smoothing is a debiased exponential moving average that a diverged step does not spoil.
- A missing folder or main.log, a log with nothing to plot, an output that cannot be written: one line naming it,
  a nonzero exit, no traceback, no file written.
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from llmpy.logger import Logger, read_main_log
from test_train_gpt2 import B, T, base_args, write_files

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "dev"))
import plot  # noqa: E402  (dev/plot.py)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Folders of two 2-step runs from one model file: "mainline", train_gpt2.py's (warmup, so the lr changes), and
    "torch", the PyTorch reference's (a val loss every step, another learning rate); both log every field (loss, lr,
    norm, ms, tok/s). Run side by side, one thread each (the interpreter's steps take seconds)."""
    root = tmp_path_factory.mktemp("runs")
    files = write_files(root)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    commands = [["train_gpt2.py", *base_args(files), "-x", 2, "-u", 2, "-v", 2, "-m", 1, "-s", 0, "-o", "mainline"],
                ["train_gpt2_torch.py", "--init_from", files["model"], "--input_bin", files["train"],
                 "--input_val_bin", files["val"], "-b", B, "-t", T, "--num_iterations", 2, "--learning_rate", 1e-3,
                 "--val_loss_every", 1, "--val_max_steps", 1, "--sample_every", 0, "--device", "cpu",
                 "--output_dir", "torch"]]
    procs = [subprocess.Popen([sys.executable, str(REPO / script), *map(str, args)], cwd=root, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for script, *args in commands]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    return root


def logged(folder):
    """{field: ([steps], [values])} as main.log's lines have them, in file order (the runs here never resume)."""
    fields = {}
    for line in (Path(folder) / "main.log").read_text().splitlines():
        step, *items = line.split()
        for item in items:
            key, value = item.split(":")
            steps, values = fields.setdefault(key, ([], []))
            steps.append(int(step.removeprefix("s:")))
            values.append(float(value))
    return fields


def panel(figure, title):
    [ax] = [ax for ax in figure.axes if ax.get_title().startswith(title)]
    return ax


def line_data(ax, label):
    """([x], [y]) of the one line labelled label."""
    [line] = [line for line in ax.get_lines() if line.get_label() == label]
    return [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]


def titles(figure):
    return [ax.get_title() for ax in figure.axes]


def test_the_figure_draws_each_runs_logged_values(runs):
    names = ["mainline", "torch"]
    figure = plot.draw([(name, plot.read_run(runs / name)) for name in names])
    assert titles(figure) == ["train loss (smoothed 0.9)", "val loss", "learning rate", "grad norm",
                              "tokens per second"]  # no HellaSwag panel: neither run logged an eval line
    for name in names:
        log = logged(runs / name)
        steps, losses = log["trl"]
        assert steps == [0, 1]
        assert line_data(panel(figure, "train loss"), name) == log["trl"]
        assert line_data(panel(figure, "train loss"), f"{name} smoothed") == (steps, plot.smooth(losses, 0.9))
        assert line_data(panel(figure, "val loss"), name) == log["tel"]
    assert logged(runs / "mainline")["tel"][0] == [0, 2] and logged(runs / "torch")["tel"][0] == [0, 1, 2]
    assert logged(runs / "mainline")["lr"][1][0] < logged(runs / "mainline")["lr"][1][1]  # warming up
    for title, field in (("learning rate", "lr"), ("grad norm", "norm"), ("tokens per second", "tok/s")):
        for name in names:
            assert line_data(panel(figure, title), name) == logged(runs / name)[field], (title, name)
        assert [line.get_label() for line in panel(figure, title).get_lines()] == names

    colours = {name: {line.get_color() for ax in figure.axes for line in ax.get_lines()
                      if line.get_label().split()[0] == name} for name in names}
    assert colours["mainline"] != colours["torch"] and all(len(c) == 1 for c in colours.values())  # one a run
    [legend] = figure.legends
    assert [(text.get_text(), {handle.get_color()}) for text, handle in zip(legend.get_texts(),
                                                                              legend.legend_handles)] == \
        [(name, colours[name]) for name in names]


def test_the_command_writes_a_png_and_prints_each_runs_best_val_loss(runs):
    result = subprocess.run([sys.executable, str(REPO / "dev" / "plot.py"), "mainline", "torch", "-o", "runs.png"],
                            cwd=runs, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    image = runs / "runs.png"
    assert image.read_bytes().startswith(PNG_SIGNATURE)
    height, width, channels = matplotlib.image.imread(image).shape
    assert width > 1000 and height > 500 and channels == 4
    assert not [p for p in os.listdir(runs) if ".tmp" in p]  # written through a temporary file, renamed
    for name in ("mainline", "torch"):
        steps, losses = logged(runs / name)["tel"]
        best = min(range(len(losses)), key=losses.__getitem__)
        assert f"{name}: steps 0..2, min val loss {losses[best]:.4f} at step {steps[best]}\n" in result.stdout
    assert result.stdout.endswith("wrote runs.png\n")


def test_compare_logs_reads_main_log_through_the_same_parser(runs):
    result = subprocess.run([sys.executable, str(REPO / "dev" / "compare_logs.py"), "mainline/main.log",
                             "torch/main.log"], cwd=runs, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("2 common train steps 0..1:")
    assert [line.split()[2] for line in result.stdout.splitlines() if line.startswith("val step")] == ["0:", "2:"]


# A run of llm.c's (its logger's formats), killed after step 4's val loss with its last checkpoint at step 2, then
# resumed from it: llm.c appends, so steps 2 to 4 come again. Then step 4's val loss once more (a second resume,
# from a checkpoint at step 4), and a line cut off by a kill mid-write.
LLMC_LOG = """\
s:0 tel:11.0000
s:0 eval:0.2500
s:0 trl:11.0100 lr:0.000100 norm:9.50
s:1 trl:10.0000 lr:0.000200 norm:8.00
s:2 tel:9.5000
s:2 eval:0.2600
s:2 trl:9.4000 lr:0.000300 norm:7.00
s:3 trl:9.9000 lr:0.000300 norm:6.00
s:4 tel:9.8000
s:2 tel:9.5000
s:2 eval:0.2600
s:2 trl:9.3000 lr:0.000300 norm:7.10
s:3 trl:8.9000 lr:0.000300 norm:6.50
s:4 tel:8.7000
s:4 tel:8.6000
s:4 trl:8.8"""


def test_a_resumed_llmc_log_reads_as_the_run_that_went_on(tmp_path):
    (tmp_path / "llmc").mkdir()
    (tmp_path / "llmc" / "main.log").write_text(LLMC_LOG)
    fields = plot.read_run(tmp_path / "llmc")
    assert plot.read_run(tmp_path / "llmc" / "main.log") == fields  # the folder or the log itself
    assert fields == {"tel": {0: 11.0, 2: 9.5, 4: 8.6}, "eval": {0: 0.25, 2: 0.26},
                      "trl": {0: 11.01, 1: 10.0, 2: 9.3, 3: 8.9}, "lr": {0: 1e-4, 1: 2e-4, 2: 3e-4, 3: 3e-4},
                      "norm": {0: 9.5, 1: 8.0, 2: 7.1, 3: 6.5}}
    figure = plot.draw([("llmc", fields)])
    assert titles(figure) == ["train loss (smoothed 0.9)", "val loss", "HellaSwag accuracy", "learning rate",
                              "grad norm"]  # llm.c logs no tok/s
    assert line_data(panel(figure, "train loss"), "llmc") == ([0, 1, 2, 3], [11.01, 10.0, 9.3, 8.9])
    assert line_data(panel(figure, "val loss"), "llmc") == ([0, 2, 4], [11.0, 9.5, 8.6])
    assert line_data(panel(figure, "HellaSwag accuracy"), "llmc") == ([0, 2], [0.25, 0.26])
    assert {ax.get_xscale() for ax in plot.draw([("llmc", fields)], log_x=True).axes} == {"log"}


def read_main_log_of(path, text):
    path.write_text(text)
    return read_main_log(path)


def test_hellaswag_is_drawn_for_the_runs_that_have_it(tmp_path):
    with_eval = read_main_log_of(tmp_path / "with.log", "s:0 tel:11.0\ns:0 eval:0.25\ns:0 trl:11.0 lr:0.1 norm:1\n")
    without = read_main_log_of(tmp_path / "without.log", "s:0 tel:10.0\ns:0 trl:10.0 lr:0.1 norm:1\n")
    figure = plot.draw([("with", with_eval), ("without", without)], smoothing=0)
    assert titles(figure) == ["train loss", "val loss", "HellaSwag accuracy", "learning rate", "grad norm"]
    assert [line.get_label() for line in panel(figure, "HellaSwag").get_lines()] == ["with"]
    assert [line.get_label() for line in panel(figure, "train loss").get_lines()] == ["with", "without"]


def test_steps_the_outlier_guard_skipped_are_marked_on_the_train_loss(tmp_path):
    logger = Logger(tmp_path)
    for step, (loss, skipped) in enumerate([(3.0, False), (9.0, True), (2.9, False)]):
        logger.log_train(step, loss, 1e-3, 1.0, 100.0, 5e4, zscores=(0.5, 0.1), skipped=skipped)
    logger.close()
    figure = plot.draw([("guarded", plot.read_run(tmp_path))])
    assert line_data(panel(figure, "train loss"), "guarded skipped") == ([1], [9.0])


def test_smoothing_is_a_debiased_moving_average_that_a_diverged_step_does_not_spoil():
    assert plot.smooth([1.0, 2.0], 0.5) == [1.0, (0.5 * 0.5 + 0.5 * 2.0) / 0.75]
    assert plot.smooth([5.0] * 4, 0.99) == pytest.approx([5.0] * 4)  # not pulled toward 0 at the start
    assert plot.smooth([3.0, 1.0, 4.0], 0) == [3.0, 1.0, 4.0]
    assert plot.smooth([2.0, math.inf, math.nan, 2.0], 0.9) == pytest.approx([2.0] * 4)


def test_bad_inputs_and_outputs_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "main.log").write_text(LLMC_LOG)
    (tmp_path / "no_log").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "main.log").write_text("step 1/2 | loss 3.0\n\ns:1 zl:0.50\n")  # no value to plot
    monkeypatch.chdir(tmp_path)
    cases = [(["missing"], "missing: No such file or directory"),
             (["no_log"], "no_log/main.log: No such file or directory"),
             (["junk"], "junk/main.log: no `s:STEP trl|tel|eval|lr|norm|tok/s:VALUE` lines to plot"),
             (["run", "-o", "no_folder/runs.png"], "cannot write no_folder/runs.png: No such file or directory"),
             (["run", "-o", "runs.xyz"], "runs.xyz: unknown image format 'xyz': end -o with .")]
    for args, message in cases:
        monkeypatch.setattr(sys, "argv", ["plot.py", *args])
        with pytest.raises(plot.PlotError) as error:
            plot.main()
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["junk", "no_log", "run"]  # no image, no temporary file

    # as a command: the message is the one line on stderr
    result = subprocess.run([sys.executable, str(REPO / "dev" / "plot.py"), "run", "missing"], capture_output=True,
                            text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == \
        (1, "", "plot.py: error: missing: No such file or directory\n")
