"""Progress bars for the jobs a person waits for: tokenizing datasets, evaluation, export."""

from tqdm import tqdm


def progress(iterable=None, **kwargs):
    """A progress bar (tqdm) on stderr, only when that is a terminal (not in a log file or a test's pipe). It is
    wiped when done, or when an error or Ctrl-C ends the `with` block that holds it, so the lines printed and a
    one-line error or interruption never land on the bar's line."""
    return tqdm(iterable, disable=None, leave=False, dynamic_ncols=True, **kwargs)
