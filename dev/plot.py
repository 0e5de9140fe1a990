"""Plot training runs from their main.log, in one figure: llm.c's dev/vislog.ipynb as a command.

    python dev/plot.py log124M -o runs.png
    python dev/plot.py log124M log350M --smooth 0.99 --log_x -o runs.pdf

A panel for each quantity that some run logged, against the step: train loss (faint as logged, solid smoothed by
an exponential moving average; an x on each step whose update the outlier guard skipped), val loss, HellaSwag
accuracy, learning rate, grad norm, tokens per second. One colour per run, named by its folder in the legend.
Prints each run's best val loss and HellaSwag accuracy. The file's format follows -o's ending (png, pdf, svg, ...);
it is written whole or not at all.
"""

import argparse
import io
import math
import os
import sys
from pathlib import Path

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # draws into memory: no display needed
    from matplotlib.figure import Figure  # not pyplot: no global figures, no GUI backend chosen
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator
except ImportError:
    sys.exit('plot.py: error: needs matplotlib: pip install -e ".[plot]"')

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for llmpy when run as a script
from llmpy.formats import write_file_atomic  # noqa: E402
from llmpy.logger import read_main_log  # noqa: E402
from llmpy.signals import exit_quietly  # noqa: E402

# (main.log field, panel title), in the figure's order; a panel is drawn only if some run logged its field
PANELS = [("trl", "train loss"), ("tel", "val loss"), ("eval", "HellaSwag accuracy"), ("lr", "learning rate"),
          ("norm", "grad norm"), ("tok/s", "tokens per second")]
SPARSE = {"tel", "eval"}  # measured every so many steps: each point marked
DEFAULT_SMOOTH = 0.9


class PlotError(Exception):
    """A problem with an input or the output; str() is one line."""


def read_run(path):
    """The fields of a run's main.log, as read_main_log returns them; path: the run's folder, or the log itself."""
    log = os.path.join(path, "main.log") if os.path.isdir(path) else path
    try:
        fields = read_main_log(log)
    except OSError as e:
        raise PlotError(f"{log}: {e.strerror}") from None
    if not any(field in fields for field, _ in PANELS):
        raise PlotError(f"{log}: no `s:STEP {'|'.join(field for field, _ in PANELS)}:VALUE` lines to plot")
    return fields


def smooth(values, factor):
    """The exponential moving average s = factor * s + (1 - factor) * x, divided by the weight its terms have so far
    (1 - factor^n, as TensorBoard does) so that the first points are not pulled toward zero. A value that is not
    finite is left out, so one diverged step does not turn the rest of the curve into inf or nan."""
    smoothed, total, weight = [], 0.0, 0.0
    for x in values:
        if math.isfinite(x):
            total = factor * total + (1 - factor) * x
            weight = factor * weight + (1 - factor)
        smoothed.append(total / weight if weight else math.nan)
    return smoothed


def run_style(index):
    """Ten colours, then the same colours dashed, dotted, ..., so that no two of 40 runs look alike."""
    return {"color": f"C{index % 10}", "linestyle": ("-", "--", ":", "-.")[index // 10 % 4]}


def draw(runs, smoothing=DEFAULT_SMOOTH, log_x=False):
    """The figure of runs, [(name, fields as read_main_log returns them)]. Each line is labelled with its run's
    name, the train loss panel's smoothed lines and skipped steps with the name + " smoothed" and " skipped"."""
    panels = [(field, title) for field, title in PANELS if any(field in fields for _, fields in runs)]
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5 * columns, 3.5 * rows + 0.5), layout="constrained")
    # one step axis for all the panels, so that a moment of the run lines up across them
    axes = figure.subplots(rows, columns, sharex=True, squeeze=False).flatten()
    for ax in axes[len(panels):]:
        ax.remove()
    for ax, (field, title) in zip(axes, panels):
        for index, (name, fields) in enumerate(runs):
            if field not in fields:
                continue
            steps, values = list(fields[field]), list(fields[field].values())
            style = run_style(index)
            if field == "trl" and smoothing > 0:
                ax.plot(steps, values, **style, alpha=0.25, linewidth=0.8, label=name)
                ax.plot(steps, smooth(values, smoothing), **style, label=f"{name} smoothed")
            else:
                marks = {"marker": "o", "markersize": 3} if field in SPARSE else {}
                ax.plot(steps, values, **style, **marks, label=name)
            if field == "trl" and (skipped := [step for step, skip in fields.get("skip", {}).items() if skip]):
                ax.plot(skipped, [fields["trl"][step] for step in skipped], "x", color=style["color"],
                        label=f"{name} skipped")
        ax.set_title(f"{title} (smoothed {smoothing:g})" if field == "trl" and smoothing > 0 else title)
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)  # sharex hides them above the last row, which may lack a panel
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log", nonpositive="mask")  # step 0 left out, not drawn at the axis's edge
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 0.25 on a short run's axis
    handles = [Line2D([], [], **run_style(index), label=name) for index, (name, _) in enumerate(runs)]
    figure.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4))
    return figure


def summary(name, fields):
    """One line: the run's steps, best val loss and HellaSwag accuracy, as vislog.ipynb prints them."""
    steps = sorted({step for values in fields.values() for step in values})
    parts = [f"{name}: steps {steps[0]}..{steps[-1]}"]
    for field, what, best in (("tel", "min val loss", min), ("eval", "max HellaSwag", max)):
        if field in fields:
            step = best(fields[field], key=fields[field].get)
            parts.append(f"{what} {fields[field][step]:.4f} at step {step}")
    return ", ".join(parts)


def smoothing_factor(text):
    """argparse type for --smooth."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number from 0 (no smoothing) up to but not 1, not {text!r}")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="a run's folder (train_gpt2.py's or llm.c's -o), "
                                                                   "or its main.log")
    parser.add_argument("-o", "--output", default="runs.png", help="the figure's file (default: %(default)s)")
    parser.add_argument("--smooth", type=smoothing_factor, default=DEFAULT_SMOOTH,
                        help="the train loss's moving-average factor: 0 none, 0.99 strong (default: %(default)s)")
    parser.add_argument("--log_x", action="store_true", help="a logarithmic step axis (step 0 is left out)")
    args = parser.parse_args()

    image_format = os.path.splitext(args.output)[1][1:].lower()
    if image_format not in FigureCanvasAgg.get_supported_filetypes():
        raise PlotError(f"{args.output}: unknown image format {image_format!r}: end -o with "
                        f"{', '.join('.' + f for f in sorted(FigureCanvasAgg.get_supported_filetypes()))}")
    runs = [(os.path.normpath(path), read_run(path)) for path in args.runs]
    image = io.BytesIO()
    FigureCanvasAgg(draw(runs, args.smooth, args.log_x)).print_figure(image, format=image_format, dpi=120)
    try:
        write_file_atomic(args.output, [image.getvalue()])
    except OSError as e:
        raise PlotError(f"cannot write {args.output}: {e.strerror or e}") from None
    for name, fields in runs:
        print(summary(name, fields))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    with exit_quietly("plot.py"):
        try:
            main()
        except PlotError as e:
            sys.exit(f"plot.py: error: {e}")
