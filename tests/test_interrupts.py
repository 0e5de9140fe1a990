"""Ctrl-C and SIGTERM in the NumPy trainer, the PyTorch reference (alone and under torchrun) and the dataset scripts.

Each program is started on small local inputs and signalled once a line it prints shows it at work (a step's line;
for a dataset script its first shard written, or the start of the tokenizing), long before it would finish. It must
exit with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM) and print exactly one line on stderr,
`<prog>: interrupted by SIGINT`, and no traceback anywhere (llmpy/signals.py's exit_quietly). A dataset script must
leave no half-written shard: every shard in its folder reads back whole and no temporary file is left.

Ctrl-C in a terminal signals the program's whole process group, the dataset scripts' tokenizing worker processes
too (they must stay silent): the "group" cases send the signal to the group. `kill PID` signals the program alone,
whose multiprocessing pool then ends its workers: the "program" cases.

The dataset scripts draw progress bars on stderr when it is a terminal (and only then: the runs above, on pipes,
print nothing else on stderr). On a terminal, Ctrl-C wipes the bar before the one line.
"""

import fcntl
import json
import os
import random
import re
import signal
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import numpy as np
import pytest

from llmpy import formats
from llmpy.signals import DeferredInterrupts, Interrupted

REPO = Path(__file__).resolve().parents[1]
DATA_SCRIPTS = REPO / "dev" / "data"
TIMEOUT_S = 120  # a program still running then hangs: it is killed and the test fails


def interrupt(command, started, signum, target, cwd=REPO, terminal=False):
    """Runs command, reads its stdout up to the first line containing `started`, sends signum to the program or
    its process group (target "program" or "group"); returns (exit status, stdout, stderr). terminal: stderr goes
    to a terminal (a pseudo-terminal), as in a shell, and what it showed is returned, its line ends as \\n."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line as it is printed, not when a pipe's buffer fills
    screen = Terminal() if terminal else None
    proc = subprocess.Popen(list(map(str, command)), cwd=cwd, env=env, stdout=subprocess.PIPE, text=True,
                            stderr=screen.program_end if screen else subprocess.PIPE, start_new_session=True)
    if screen:
        screen.start()
    watchdog = threading.Timer(TIMEOUT_S, os.killpg, (proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        stdout = []
        for line in proc.stdout:
            stdout.append(line)
            if started in line:
                if target == "group":
                    os.killpg(proc.pid, signum)
                else:
                    proc.send_signal(signum)
                break
        rest, stderr = proc.communicate()
    finally:
        watchdog.cancel()
    if screen:
        stderr = screen.received()
    stdout = "".join(stdout) + rest
    assert started in stdout, f"{command[1]} ended before printing {started!r}: {stdout}{stderr}"
    return proc.returncode, stdout, stderr


class Terminal:
    """A pseudo-terminal 100 columns wide (tqdm draws nothing on one of 0 columns) for a program's stderr, and what
    it received, read as it comes: a program writing to a full terminal would wait for a reader forever."""

    def __init__(self):
        self.our_end, self.program_end = os.openpty()
        fcntl.ioctl(self.program_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
        self.chunks = []
        self.reader = threading.Thread(target=self._read)

    def start(self):
        """Once the program has started: from then on it holds the only copy of its end."""
        os.close(self.program_end)
        self.reader.start()

    def _read(self):
        while True:
            try:
                chunk = os.read(self.our_end, 1 << 16)
            except OSError:  # EIO once the program and every process it started have closed their end
                break
            if not chunk:
                break
            self.chunks.append(chunk)

    def received(self):
        self.reader.join()
        os.close(self.our_end)
        return b"".join(self.chunks).decode().replace("\r\n", "\n")


def assert_one_line(status, stdout, stderr, prog, signum):
    assert status == 128 + signum, f"exit status {status}: {stdout}{stderr}"
    assert stderr == f"{prog}: interrupted by {signal.Signals(signum).name}\n", stderr
    assert "Traceback" not in stdout


SIGNALS = [(signal.SIGINT, "group"), (signal.SIGTERM, "program")]
SIGNAL_IDS = ["SIGINT-group", "SIGTERM-program"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    formats.write_shard(folder / "train.bin", rng.integers(0, 50257, 20_000).astype(np.uint16))
    return folder / "train.bin"


@pytest.mark.parametrize("signum, target", SIGNALS, ids=SIGNAL_IDS)
def test_numpy_trainer(shards, signum, target):
    command = [sys.executable, REPO / "train_gpt2_cpu.py", "-e", "tiny", "-i", shards, "-b", 2, "-t", 16,
               "-x", 100_000, "-v", 0, "-s", 0]
    assert_one_line(*interrupt(command, "step 1/", signum, target), "train_gpt2_cpu.py", signum)


@pytest.mark.parametrize("signum, target", SIGNALS, ids=SIGNAL_IDS)
def test_pytorch_reference(shards, signum, target):
    command = [sys.executable, REPO / "train_gpt2_torch.py", "--model", "tiny", "--device", "cpu",
               "--input_bin", shards, "--input_val_bin", "", "-b", 2, "-t", 16, "--num_iterations", 100_000]
    assert_one_line(*interrupt(command, "| loss ", signum, target), "train_gpt2_torch.py", signum)


def test_pytorch_reference_under_torchrun_prints_at_most_one_line_a_rank(shards, tmp_path):
    """Ctrl-C reaches torchrun and both ranks (and torchrun passes it on again). torchrun itself prints warnings and
    its own traceback; --tee 3 prefixes each line of rank r with [default<r>]:, which tells the ranks' lines apart."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "--tee", 3,
               "--log_dir", tmp_path, REPO / "train_gpt2_torch.py", "--model", "tiny", "--device", "cpu",
               "--input_bin", shards, "--input_val_bin", "", "-b", 2, "-t", 16, "--num_iterations", 100_000]
    status, stdout, stderr = interrupt(command, "| loss ", signal.SIGINT, "group")
    assert status != 0

    def rank_lines(output, rank):
        return [line for line in output.splitlines() if line.startswith(f"[default{rank}]:")]

    said = "train_gpt2_torch.py: interrupted by SIGINT"
    assert rank_lines(stderr, 0) == [f"[default0]:{said}"], stderr
    assert rank_lines(stderr, 1) in ([], [f"[default1]:{said}"]), stderr  # a rank other than 0 may stay silent
    assert "Traceback" not in stdout


def random_text(seed, words):
    rng = random.Random(seed)
    vocabulary = ["the", "cat", "sat", "Hello", "world", "I'll", "3.14", "café", "日本語", ",", ".", "\n", "\n\n"]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


@pytest.fixture(scope="module")
def documents(tmp_path_factory):
    """10,000 documents as JSON lines, each with both scripts' fields: ~3M tokens, a second or more of work."""
    path = tmp_path_factory.mktemp("documents") / "documents.jsonl"
    lines = [json.dumps({"text": text, "story": text}) + "\n" for text in (random_text(i, 200) for i in range(100))]
    path.write_text("".join(lines * 100))
    return path


def assert_only_whole_shards(folder):
    files = sorted(Path(folder).iterdir())
    assert files and all(f.suffix == ".bin" for f in files), [f.name for f in files]  # no temporary file left
    for f in files:
        formats.read_shard(f)  # a FormatError for a truncated one


@pytest.mark.usefixtures("tiktoken_file")
@pytest.mark.parametrize("script, signum, target", [("fineweb.py", signal.SIGINT, "group"),
                                                    ("fineweb.py", signal.SIGTERM, "program"),
                                                    ("tinystories.py", signal.SIGINT, "group")],
                         ids=["fineweb-SIGINT-group", "fineweb-SIGTERM-program", "tinystories-SIGINT-group"])
def test_dataset_scripts_with_worker_processes(documents, tmp_path, script, signum, target):
    command = [sys.executable, DATA_SCRIPTS / script, "--input", documents, "--output_dir", tmp_path,
               "--shard_size", 100_000, "--processes", 2]
    status, stdout, stderr = interrupt(command, "wrote ", signum, target)
    assert_one_line(status, stdout, stderr, script, signum)
    assert_only_whole_shards(tmp_path)


@pytest.mark.usefixtures("tiktoken_file")
def test_ctrl_c_on_a_terminal_wipes_the_progress_bar_before_its_one_line(documents, tmp_path):
    """On a terminal the tokenizing shows a progress bar (stderr); Ctrl-C wipes it (spaces over it, back to the
    line's start) and the one line takes its place, as the last thing on the screen."""
    command = [sys.executable, DATA_SCRIPTS / "fineweb.py", "--input", documents, "--output_dir", tmp_path,
               "--shard_size", 100_000, "--processes", 2]
    status, stdout, screen = interrupt(command, "wrote ", signal.SIGINT, "group", terminal=True)
    assert status == 130, screen
    assert "\rtokenizing: " in screen and " documents/s]" in screen
    assert re.search(r"\r *\rfineweb.py: interrupted by SIGINT\n$", screen), screen[-300:]
    assert "Traceback" not in screen + stdout
    assert re.fullmatch(r"(wrote \S+_\d{6}\.bin: 100,000 tokens\n)+", stdout), stdout  # the bar stays off stdout
    assert_only_whole_shards(tmp_path)


@pytest.mark.usefixtures("tiktoken_file")
def test_tinyshakespeare_while_tokenizing(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("\n\n".join([random_text(0, 20_000)] * 100))  # ~3M tokens: a second or more of tokenizing
    output = tmp_path / "shards"
    command = [sys.executable, DATA_SCRIPTS / "tinyshakespeare.py", "--input", text, "--output_dir", output]
    assert_one_line(*interrupt(command, "tokenizing", signal.SIGTERM, "program"), "tinyshakespeare.py",
                    signal.SIGTERM)
    assert not output.exists()


def test_deferred_interrupts_raise_only_at_a_check_or_the_blocks_end():
    """Under DeferredInterrupts a signal is only noted (code waiting inside a lock is not interrupted there); check()
    and the end of the block raise it as Interrupted with its number. Outside, the previous handler is back."""
    previous = signal.getsignal(signal.SIGTERM)
    with DeferredInterrupts() as interrupts:
        interrupts.check()  # nothing yet
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a second one changes nothing: the first is raised
        with pytest.raises(Interrupted) as raised:
            interrupts.check()
        assert raised.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous

    with pytest.raises(Interrupted) as raised:
        with DeferredInterrupts():
            os.kill(os.getpid(), signal.SIGINT)
            reached = True
    assert reached and raised.value.signum == signal.SIGINT
