"""Long runs: train_gpt2.py killed, stopped and resumed (-n, -y 1), on the CPU under Triton's interpreter.

The specification: a run resumed from its newest complete checkpoint, after a SIGKILL at any moment (inside a
checkpoint write too), ends exactly where the run that was never stopped ends: the same losses in main.log (every
`trl` and `tel` value, to the 6 decimals it writes) and the same final model file, byte for byte. On the CPU
everything is deterministic, so anything short of equal is a bug: a batch read twice or skipped, a moment of the
optimizer state lost, the learning rate or the sampling RNG off by a step.

- 12 runs of one process, each killed once at a random moment and resumed to the end. The checkpoint writer is
  slowed down (LLMPY_CHECKPOINT_SLOW_WRITE_S) so that half of the kills are aimed inside a checkpoint's files.
- 2 processes (gloo) with ZeRO-1: killed and resumed on 2 processes, exactly; resumed on 1 process instead, the
  optimizer shards re-assembled, within fp32 rounding of the uninterrupted 2-process run (unshuffled data, so both
  read the same tokens; only the order of the gradient sums differs).
- SIGTERM and SIGINT: the step finishes, a checkpoint is written, one line, exit 143 / 130; the resume is exact. A
  second signal stops at once with one line; the checkpoint it interrupted is never read.
- The outlier guard skips exactly the updates it is told to (the decision itself: tests/test_outlier.py).
- Outputs are checked before any training, and bad checkpoints say which file and what is wrong.
"""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from llmpy import formats
from test_distributed import launch
from test_train_gpt2 import STEP_LINE, B, T, base_args, write_files

REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # checkpoints at steps 2, 4 and 6
RUN_FLAGS = ["-x", STEPS, "-n", 2, "-nk", 2, "-v", 4, "-m", 1, "-s", 4, "-g", 3]
TRIALS = 12  # kills: the even ones aimed inside a checkpoint write, the odd ones anywhere
SLOW_WRITE_S = 0.25  # after each checkpoint file: a checkpoint's three files take ~0.75 s to write
ENV = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
           LLMPY_CHECKPOINT_SLOW_WRITE_S=str(SLOW_WRITE_S))


def start(args, cwd):
    return subprocess.Popen([sys.executable, str(REPO / "train_gpt2.py"), *map(str, args)], cwd=cwd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def start_until_step(args, cwd, step):
    """Starts train_gpt2.py and returns it once it has printed the line of step `step` (or ended)."""
    proc = start(args, cwd)
    for line in proc.stdout:
        match = STEP_LINE.match(line)
        if match and int(match[1]) >= step:
            break
    return proc


def run(args, cwd, timeout=300):
    proc = start(args, cwd)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(folder):
    """main.log's (step, kind, loss) of every train and val line: the values as written."""
    lines = (Path(folder) / "main.log").read_text().splitlines()
    return [(int(m[1]), m[2], m[3]) for m in (re.match(r"s:(\d+) (trl|tel):(\S+)", line) for line in lines)]


def in_checkpoint_write(folder):
    """Whether the folder shows a checkpoint caught mid-write: a temporary, or a checkpoint's files without DONE."""
    names = os.listdir(folder)
    steps = {m.group(1) for m in map(re.compile(r"(?:model|state)_(\d{8})").match, names) if m}
    return any(".tmp" in n for n in names) or any(f"DONE_{s}" not in names for s in steps)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("long_runs"))


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The run that is never stopped: its log's losses, final model file and last sample."""
    folder = tmp_path_factory.mktemp("reference")
    code, out, err = run([*base_args(files), *RUN_FLAGS, "-o", folder / "run"], folder)
    assert code == 0, err
    return losses(folder / "run"), (folder / "run" / f"model_{STEPS:08d}.bin").read_bytes(), last_sample(out)


def last_sample(stdout):
    return re.findall(r"^generating:\n---\n(.*)\n---$", stdout, re.M)[-1]


def kill_and_resume(trial, files, folder):
    """Trial `trial`: starts the run, SIGKILLs it at a moment drawn from the trial's seed, then resumes it with -y 1
    to the end. Even trials are killed just after a checkpoint starts (the step line of an even step: the save
    follows it), within the ~0.75 s its files take; odd trials after any step line, within 1.5 s."""
    rng = random.Random(trial)
    args = [*base_args(files), *RUN_FLAGS, "-o", folder, "-y", 1]
    after_step = rng.choice(range(2, STEPS, 2)) if trial % 2 == 0 else rng.randint(1, STEPS)
    delay = rng.uniform(0, 0.7) if trial % 2 == 0 else rng.uniform(0, 1.5)
    proc = start_until_step(args, folder.parent, after_step)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    caught_writing = in_checkpoint_write(folder)
    code, out, err = run(args, folder.parent)
    assert code == 0, f"trial {trial}: {err}"
    assert "Traceback" not in out + err
    return caught_writing, out


def test_runs_killed_at_random_moments_resume_to_the_same_end(files, reference, tmp_path):
    ref_losses, ref_model, ref_sample = reference
    results = {}

    def trials(indices):
        for trial in indices:
            folder = tmp_path / f"trial{trial}" / "run"
            folder.parent.mkdir()
            results[trial] = (folder, *kill_and_resume(trial, files, folder))

    workers = [threading.Thread(target=trials, args=(range(i, TRIALS, 2),)) for i in range(2)]  # 2 cores
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert sorted(results) == list(range(TRIALS))
    for trial, (folder, caught_writing, out) in sorted(results.items()):
        assert losses(folder) == ref_losses, f"trial {trial}"
        assert (folder / f"model_{STEPS:08d}.bin").read_bytes() == ref_model, f"trial {trial}"
        assert last_sample(out) == ref_sample, f"trial {trial}"
        assert not any(".tmp" in name for name in os.listdir(folder)), f"trial {trial}: temporaries left"
    writes_hit = sum(caught_writing for _, caught_writing, _ in results.values())
    assert writes_hit >= 4, f"only {writes_hit} of {TRIALS} kills landed inside a checkpoint write"


def test_sigterm_writes_a_checkpoint_says_one_line_and_the_resume_is_exact(files, reference, tmp_path):
    folder = tmp_path / "run"
    args = [*base_args(files), *RUN_FLAGS, "-o", folder]
    proc = start_until_step(args, tmp_path, 3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"train_gpt2\.py: stopped by SIGTERM after step (\d+); checkpoint \1 in "
                                            r".*: continue with the same command and -y 1", lines[0]), err
    stopped_at = int(re.search(r"after step (\d+)", lines[0])[1])
    assert stopped_at in (3, 4)  # the signal came after the line of step 3: before the end of that step, or in 4
    assert (folder / f"DONE_{stopped_at:08d}").exists()
    resume_to_the_reference(args, tmp_path, folder, stopped_at, reference)


def resume_to_the_reference(args, cwd, folder, step, reference):
    """Resumes the run in folder with -y 1: from the checkpoint of step, to the reference's end exactly."""
    code, out, err = run([*args, "-y", 1], cwd)
    assert code == 0, err
    assert f"resumed from {folder / f'model_{step:08d}.bin'}: step {step}" in out
    assert losses(folder) == reference[0]
    assert (folder / f"model_{STEPS:08d}.bin").read_bytes() == reference[1]


def test_a_second_signal_stops_at_once_and_the_unfinished_checkpoint_is_never_read(files, reference, tmp_path):
    folder = tmp_path / "run"
    args = [*base_args(files), *RUN_FLAGS, "-o", folder]
    proc = start_until_step(args, tmp_path, 3)
    proc.send_signal(signal.SIGINT)
    # the stop's checkpoint (3 or 4) is being written, slowly: once its model file is there, its state file and DONE
    # marker are still SLOW_WRITE_S and more away; interrupt it then
    deadline = time.monotonic() + 60
    while not any((folder / f"model_{s:08d}.bin").exists() for s in (3, 4)) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in out + err
    assert err == "train_gpt2.py: second SIGINT: stopped at once; the newest complete checkpoint is step 2\n"
    assert not (folder / "DONE_00000003").exists() and not (folder / "DONE_00000004").exists()
    resume_to_the_reference(args, tmp_path, folder, 2, reference)


def test_a_signal_without_an_output_folder_stops_with_one_line(files, tmp_path):
    proc = start_until_step([*base_args(files), "-x", 20, "-v", 0, "-s", 0], tmp_path, 1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in out + err
    assert re.fullmatch(r"train_gpt2\.py: stopped by SIGINT after step \d+; no -o folder, so no checkpoint\n", err)


def test_two_ranks_with_zero1_resume_exactly_and_on_one_rank(files, tmp_path):
    """torchrun, 2 gloo processes, -z 1. Killed (the whole process group) after step 5, resumed on 2 processes: the
    same log and model as the uninterrupted 2-process run. Resumed on 1 process from the 2-process checkpoint of
    step 4 instead (unshuffled: both read the same tokens): the shards of m, v and the weights re-assembled, the
    run ends within fp32 rounding of the 2-process one. Measured 2e-7; allowed 1e-5 (test_distributed.py's
    bound for 1 against 2 processes). Shuffled, the one process would read other batches and differ by ~lr."""
    args = [*base_args(files), "-x", 6, "-d", 2 * B * T, "-n", 2, "-v", 3, "-m", 2, "-s", 0, "-z", 1,
            "--dist_timeout", 60]
    for shuffle in (1, 0):
        reference = tmp_path / f"reference{shuffle}"
        reference.mkdir()
        results, _ = launch("torchrun", 2, [*args, "--shuffle", shuffle, "-o", reference / "run"], reference,
                            timeout=240)
        assert results[0][0] == 0, results[0][2]
    killed = tmp_path / "killed"
    killed.mkdir()
    resume_args = [*args, "-o", killed / "run", "-y", 1]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(REPO / "train_gpt2.py"), *map(str, resume_args)], cwd=killed, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    for line in proc.stdout:
        if STEP_LINE.match(line) and int(STEP_LINE.match(line)[1]) == 5:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    results, _ = launch("torchrun", 2, resume_args, killed, timeout=240)
    assert results[0][0] == 0, results[0][2]
    assert losses(killed / "run") == losses(tmp_path / "reference1" / "run")
    assert (killed / "run" / "model_00000006.bin").read_bytes() == \
        (tmp_path / "reference1" / "run" / "model_00000006.bin").read_bytes()

    one = tmp_path / "one" / "run"
    one.mkdir(parents=True)
    for name in os.listdir(tmp_path / "reference0" / "run"):  # the 2-process checkpoint of step 4
        if "00000004" in name:
            (one / name).write_bytes((tmp_path / "reference0" / "run" / name).read_bytes())
    results, _ = launch("plain", 1, [*args, "--shuffle", 0, "-o", one, "-y", 1], one.parent, timeout=240)
    code, out, err = results[0]
    assert code == 0, err
    assert "resumed from" in out and "written by 2 process(es)" in out
    assert "data loader cannot continue" in out  # 2 processes' order, 1 process now: it skips as many tokens
    _, two_final = formats.read_model(tmp_path / "reference0" / "run" / "model_00000006.bin")
    _, one_final = formats.read_model(one / "model_00000006.bin")
    _, at_step4 = formats.read_model(one / "model_00000004.bin")
    assert np.abs(two_final - at_step4).max() > 1e-4  # steps 5 and 6 moved the weights
    np.testing.assert_allclose(one_final, two_final, rtol=0, atol=1e-5)


# (what, extra flags, a function preparing the folder (tmp_path) or None, what the one stderr line says)
BAD_OUTPUTS = [
    ("-o is a file", ["-o", "{tmp}/afile"], lambda t: (t / "afile").write_text("x"),
     r"-o/--output_log_dir .*afile: cannot write there"),
    ("--write_model in a file's folder", ["--write_model", "{tmp}/afile/final.bin"],
     lambda t: (t / "afile").write_text("x"), r"--write_model .*afile/final\.bin: cannot write there"),
    ("--write_model is a folder", ["--write_model", "{tmp}"], None, r"--write_model .*: is a folder"),
    ("-y 1 without -o", ["-y", 1], None, r"-y/--resume 1 needs -o/--output_log_dir"),
    ("-n without -o", ["-n", 5], None, r"-n/--checkpoint_every 5 needs -o/--output_log_dir"),
    ("negative -nk", ["-nk", -1, "-o", "{tmp}/run"], None, r"-nk/--checkpoints_keep must be >= 0"),
    ("nan -sl", ["-sl", "nan"], None, r"-sl/--skip_update_lossz must be >= 0 and finite"),
]


@pytest.mark.parametrize("name, extra, prepare, message", BAD_OUTPUTS, ids=[b[0] for b in BAD_OUTPUTS])
def test_bad_outputs_are_one_line_before_any_training(files, tmp_path, name, extra, prepare, message):
    if prepare:
        prepare(tmp_path)
    code, out, err = run([*base_args(files), "-x", 1, *[str(a).format(tmp=tmp_path) for a in extra]], tmp_path)
    assert code == 1 and "Traceback" not in out + err
    assert not STEP_LINE.search(out), "it trained before failing"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), err


def test_checkpoints_that_do_not_fit_are_named(files, reference, tmp_path):
    """A fresh run into a folder of checkpoints is refused (they would be mixed up); resuming them with another
    model says which file holds what; a truncated newest state is passed over for the one before."""
    folder = tmp_path / "run"
    args = [*base_args(files), *RUN_FLAGS, "-o", folder]
    assert run([*args, "-x", 4], tmp_path)[0] == 0  # checkpoints 2 and 4 (of a 4-step schedule: -x differs)
    code, out, err = run(args, tmp_path)
    assert code == 1 and re.fullmatch(r"train_gpt2\.py: error: -o/--output_log_dir .*run holds the checkpoints of "
                                      r"an earlier run \(the newest of step 4\): continue it with -y 1, or give "
                                      r"another folder\n", err), err
    code, out, err = run([*args, "-y", 1, "-e", "d2c32h2"], tmp_path)
    assert code == 1 and re.search(r"model_00000004\.bin: holds a model of .*num_layers=2, num_heads=4, "
                                   r"channels=64.*but -e/--init d2c32h2 is", err), err
    state = folder / "state_00000004_00000.bin"
    state.write_bytes(state.read_bytes()[:5000])
    code, out, err = run([*args, "-y", 1, "-x", 4], tmp_path)
    assert code == 0, err
    assert re.search(r"note: checkpoint 4 is not usable \(.*state_00000004_00000\.bin: 5000 bytes: not a state of "
                     r"this model's 134,912 parameters \(other model, or truncated\)\)", out), out
    assert "resumed from" in out and "step 2" in out


def test_max_steps_zero_only_evaluates(files, tmp_path):
    code, out, err = run([*base_args(files), "-x", 0, "-v", 1, "-m", 1, "-o", tmp_path / "run"], tmp_path)
    assert code == 0, err
    assert not STEP_LINE.search(out) and re.search(r"^val loss \d", out, re.M)
    assert (tmp_path / "run" / "main.log").read_text().startswith("s:0 tel:")


def test_an_fp8_run_resumes_exactly(files, tmp_path):
    """--precision fp8: the checkpoint carries the delayed scales' amax histories, so a run resumed from step 2 (in
    a fresh folder) scales its casts as the run that went on did, and ends as it: the same losses, the same model
    file. (Without them its first casts would take their own amax, and the runs would part in the last bits.)"""
    args = [*base_args(files), "--dtype", "bfloat16", "--precision", "fp8", "-x", 4, "-n", 2, "-v", 2, "-m", 1,
            "-s", 0]
    code, _, err = run([*args, "-o", tmp_path / "whole"], tmp_path)
    assert code == 0, err
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_00000002.bin", "state_00000002_00000.bin", "DONE_00000002", "main.log"):
        (resumed / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    code, out, err = run([*args, "-o", resumed, "-y", 1], tmp_path)
    assert code == 0 and "resumed from" in out and "differs" not in out, out + err
    assert losses(resumed) == losses(tmp_path / "whole")
    assert (resumed / "model_00000004.bin").read_bytes() == (tmp_path / "whole" / "model_00000004.bin").read_bytes()


def test_an_fp8_run_resumes_with_its_lm_head_in_bf16(files, tmp_path):
    """--fp8_lm_head changed on a resume: the LM head's scales are gone from (or new to) the run, so the scales all
    start afresh, and the run says so, and which run flag changed, and goes on; the startup line says where the head
    and the weight gradients run."""
    args = [*base_args(files), "--dtype", "bfloat16", "--precision", "fp8", "-x", 3, "-n", 2, "-v", 0, "-s", 0]
    code, _, err = run([*args, "-o", tmp_path / "run"], tmp_path)
    assert code == 0, err
    code, out, err = run([*args, "-o", tmp_path / "run", "-y", 1, "--fp8_lm_head", "0", "--fp8_weight_grads", "0"],
                         tmp_path)
    assert code == 0 and "resumed from" in out, out + err
    assert "matmuls fp8 (LM head bf16; weight gradients bf16)" in out, out
    assert "the checkpoint's run differs (fp8_lm_head auto -> 0; fp8_weight_grads 1 -> 0)" in out, out
    assert "note: --fp8_lm_head changed: FP8's scales start afresh" in out, out
    assert [step for step, kind, _ in losses(tmp_path / "run") if kind == "trl"] == [0, 1, 2]


def test_a_bf16_run_checkpoints_its_master_weights_and_resumes_exactly(files, tmp_path):
    """bf16: the model file is a bf16 (v5) one, the state carries the fp32 master weights; a run resumed from the
    checkpoint of step 2 (copied into a fresh folder with the log) ends as the run that went on."""
    args = [*base_args(files), "--dtype", "bfloat16", "-x", 4, "-n", 2, "-v", 2, "-m", 1, "-s", 0]
    code, _, err = run([*args, "-o", tmp_path / "whole"], tmp_path)
    assert code == 0, err
    config, n, version = formats.read_model_header(tmp_path / "whole" / "model_00000002.bin", check_length=True)
    state = (tmp_path / "whole" / "state_00000002_00000.bin").read_bytes()
    assert version == 5 and np.frombuffer(state, "<i4", 6)[4] == 1  # [4]: master weights follow m and v
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    for name in ("model_00000002.bin", "state_00000002_00000.bin", "DONE_00000002", "main.log"):
        (resumed / name).write_bytes((tmp_path / "whole" / name).read_bytes())
    code, out, err = run([*args, "-o", resumed, "-y", 1], tmp_path)
    assert code == 0 and "resumed from" in out, err
    assert losses(resumed) == losses(tmp_path / "whole")
    assert (resumed / "model_00000004.bin").read_bytes() == (tmp_path / "whole" / "model_00000004.bin").read_bytes()
