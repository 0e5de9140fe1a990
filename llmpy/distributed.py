"""Who this process is in a multi-process run, and the collectives the trainer needs (torch.distributed: NCCL
between GPUs, gloo between CPU processes in the tests).

A run has one process per GPU. Each learns its rank (0 .. world_size-1), the world size and its local rank (which
GPU of its node it drives) from the flags -pr/-pn, else from its launcher's environment, the first of:
  torchrun     RANK, WORLD_SIZE, LOCAL_RANK
  OpenMPI      OMPI_COMM_WORLD_RANK, OMPI_COMM_WORLD_SIZE, OMPI_COMM_WORLD_LOCAL_RANK
  MPICH (PMI)  PMI_RANK, PMI_SIZE, MPI_LOCALRANKID
  Slurm srun   SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID
(a missing local rank is rank % -pg/--gpus_per_node). Then the processes meet to build one process group, by the
rendezvous method -pi/--init_method:
  env    torchrun's env:// (it also sets MASTER_ADDR and MASTER_PORT)
  tcp    tcp://HOST:PORT from -ps/--server_ip HOST[:PORT] (port 29500 by default): rank 0 listens, the rest connect
  fs     a file in the folder -pf/--fs_path that every process sees (a shared file system)
  mpi    ranks from MPI; rank 0's address and a free port are broadcast with mpi4py when it is installed, else taken
         from -ps/--server_ip or MASTER_ADDR (and MASTER_PORT)
  auto   env under torchrun, mpi under mpirun/mpiexec, else tcp given -ps, fs given -pf, else one plain process
One plain process gets a Dist without a process group: its collectives do nothing, so the single-GPU path costs
nothing more than a Python call.

Failures. --dist_timeout bounds the rendezvous and, on gloo, every collective: a rank that dies (at once, its
connections close), never arrives or stops answering (after the timeout) gives the others a DistributedError, one
line naming the rank, what it was doing and why. NCCL collectives
run asynchronously to the host, so a dead peer shows up as a collective that never finishes: torch's NCCL watchdog
takes the process down once it has run for longer than the timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING's default,
left as it is), printing which collective timed out; errors NCCL reports when a collective is issued raise here.
"""

import datetime
import os
import re
import socket
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

INIT_METHODS = ("auto", "env", "tcp", "fs", "mpi")
DEFAULT_PORT = 29500  # torch's default MASTER_PORT
# (launcher, rank, world size, local rank): the environment variables a launcher sets, trusted in this order
LAUNCHER_ENVIRONMENTS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("OpenMPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("MPICH", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("Slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)
MPI_LAUNCHERS = ("OpenMPI", "MPICH")
# torch 2.13 renamed the flat-tensor collectives (the old names warn); the GPU machines run 2.11, which has only the old
_reduce_scatter = getattr(torch_dist, "reduce_scatter_single", None) or torch_dist.reduce_scatter_tensor
_all_gather = getattr(torch_dist, "all_gather_single", None) or torch_dist.all_gather_into_tensor


class DistributedError(Exception):
    """The rendezvous or a collective failed: another rank died, hung past the timeout or cannot be reached."""


@dataclass
class Dist:
    """This process's place in the run. Dist() is one plain process: no process group, every collective a no-op."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = None  # this rank's device (cuda:local_rank on a multi-GPU node)
    group: object = None  # the torch.distributed process group, None for one plain process
    timeout_s: float = None
    rendezvous: str = "none"  # how the ranks met, for the header: env://, tcp://host:port, file://path

    @property
    def is_main(self):
        """Rank 0 prints, logs, samples and writes files."""
        return self.rank == 0

    def shard(self, full):
        """This rank's slice of a flat buffer whose length is a multiple of world_size."""
        size = full.numel() // self.world_size
        return full[self.rank * size: (self.rank + 1) * size]

    def all_reduce_sum_(self, tensor, what):
        """tensor = its sum over all ranks, in place. what names it in errors ("the gradients")."""
        self._collective(f"the all-reduce of {what}", torch_dist.all_reduce, tensor, op=torch_dist.ReduceOp.SUM)

    def reduce_scatter_sum_(self, full, what):
        """Sums the flat buffer full (world_size * S,) over all ranks into this rank's slice of it, in place, and
        returns that slice (S,); the rest of full is left as it was."""
        shard = self.shard(full)
        self._collective(f"the reduce-scatter of {what}", _reduce_scatter, shard, full, op=torch_dist.ReduceOp.SUM)
        return shard

    def all_gather_(self, full, what):
        """Every rank's slice of the flat buffer full (world_size * S,) copied into full on every rank, in place."""
        self._collective(f"the all-gather of {what}", _all_gather, full, self.shard(full))

    def sum_ints(self, values, what):
        """The host integers values (a list) summed over all ranks, element by element (one small all-reduce that
        waits for the GPU; for decisions every rank must take together, not for the step's hot path)."""
        if self.group is None:
            return list(values)
        total = torch.tensor(values, dtype=torch.int64, device=self.device)
        self.all_reduce_sum_(total, what)
        return total.tolist()

    def all_agree(self, flag, what):
        """True on every rank if flag is true on every rank."""
        return self.sum_ints([int(bool(flag))], what)[0] == self.world_size

    def all_same(self, value, what):
        """Whether the integer value (|value| < 2^28) is the same on every rank: sum(v)^2 = W sum(v^2) only then."""
        total, squares = self.sum_ints([value, value * value], what)
        return total * total == self.world_size * squares

    def _collective(self, what, function, *args, **kwargs):
        if self.group is None:
            return
        try:
            function(*args, group=self.group, **kwargs)
        except RuntimeError as e:  # gloo raises RuntimeError, NCCL DistBackendError (a RuntimeError)
            raise DistributedError(f"rank {self.rank}: lost contact with another rank during {what}: "
                                   f"{_reason(e)} (--dist_timeout {self.timeout_s:g}s)") from None

    def destroy(self):
        """Leaves the process group (at the end of a run, so that gloo's threads do not abort the exit)."""
        if self.group is not None:
            torch_dist.destroy_process_group()
            self.group = None


def init_distributed(init_method="auto", server_ip=None, fs_path=None, num_processes=None, process_rank=None,
                     gpus_per_node=None, device="cuda", timeout_s=600.0):
    """Finds this process's rank, meets the others and returns its Dist (see the module docstring).

    device: "cuda" (this rank's GPU is picked from its local rank), "cuda:N" (kept) or "cpu" (gloo, for tests).
    Bad flags or environments raise ValueError; a failed rendezvous raises DistributedError. Both are one line.
    """
    device = torch.device(device)
    if init_method not in INIT_METHODS:
        raise ValueError(f"-pi/--init_method must be one of {', '.join(INIT_METHODS)}, not {init_method!r}")
    if not timeout_s > 0:
        raise ValueError(f"--dist_timeout must be positive, got {timeout_s}")
    if gpus_per_node is not None and gpus_per_node < 1:
        raise ValueError(f"-pg/--gpus_per_node must be positive, got {gpus_per_node}")
    if init_method == "auto":
        init_method = _auto_init_method(server_ip, fs_path, num_processes, process_rank)
        if init_method is None:
            return Dist(device=device)

    mpi_comm = _mpi_world() if init_method == "mpi" else None
    if mpi_comm is not None:
        launcher = ("MPI", mpi_comm.Get_rank(), mpi_comm.Get_size(), _launcher_environment_local_rank(mpi_comm))
    elif init_method == "env":
        launcher = _launcher_environment(only=("torchrun",))
        if launcher is None:
            raise ValueError("-pi env needs RANK and WORLD_SIZE in the environment: start with torchrun")
    elif init_method == "mpi":
        launcher = _launcher_environment(only=MPI_LAUNCHERS)
        if launcher is None:
            raise ValueError("-pi mpi found no MPI environment (OMPI_COMM_WORLD_RANK or PMI_RANK): start with mpirun")
    else:
        launcher = _launcher_environment()
    world_size = _pick("-pn/--num_processes", num_processes, launcher, 2, init_method)
    rank = _pick("-pr/--process_rank", process_rank, launcher, 1, init_method)
    if world_size < 1:
        raise ValueError(f"-pn/--num_processes must be positive, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"-pr/--process_rank {rank} is not in [0, {world_size}) (-pn/--num_processes {world_size})")
    local_rank = launcher[3] if launcher and launcher[3] is not None else None
    if local_rank is None:
        local_rank = rank % (gpus_per_node or _visible_gpus(device))

    if device.type == "cuda":
        if device.index is None:  # each rank drives one of the GPUs it sees (one, when Slurm binds a GPU per task)
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    url = _rendezvous_url(init_method, server_ip, fs_path, rank, mpi_comm)
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        torch_dist.init_process_group(backend, init_method=url, rank=rank, world_size=world_size, timeout=timeout,
                                      **({"device_id": device} if backend == "nccl" else {}))
    except (RuntimeError, ValueError) as e:  # DistStoreError (timeout), DistNetworkError (unreachable): RuntimeError
        raise DistributedError(f"rank {rank}: rendezvous at {url} with {world_size} processes failed: "
                               f"{_reason(e)} (--dist_timeout {timeout_s:g}s)") from None
    return Dist(rank=rank, world_size=world_size, local_rank=local_rank, device=device,
                group=torch_dist.group.WORLD, timeout_s=timeout_s, rendezvous=url)


def _auto_init_method(server_ip, fs_path, num_processes, process_rank):
    """-pi auto's choice, or None for one plain process."""
    launcher = _launcher_environment()
    if launcher and launcher[0] == "torchrun":
        return "env"
    if launcher and launcher[0] in MPI_LAUNCHERS:
        return "mpi"
    if server_ip:
        return "tcp"
    if fs_path:
        return "fs"
    # Slurm's environment alone is no reason to meet: srun gives no address (and a shell in salloc sets it too)
    if num_processes is not None or process_rank is not None:
        raise ValueError("-pn/--num_processes and -pr/--process_rank need a rendezvous: -ps/--server_ip (tcp) or "
                         "-pf/--fs_path (fs)")
    return None


def _launcher_environment(only=None):
    """(launcher, rank, world size, local rank or None) of the first launcher (of those named in only) whose rank
    and size are set, or None."""
    for name, rank_var, size_var, local_var in LAUNCHER_ENVIRONMENTS:
        if only and name not in only:
            continue
        if rank_var in os.environ and size_var in os.environ:
            local = _env_int(local_var) if local_var in os.environ else None
            return name, _env_int(rank_var), _env_int(size_var), local
    return None


def _launcher_environment_local_rank(mpi_comm):
    """Under MPI: the launcher's local rank, else this process's rank among the MPI processes on its node."""
    launcher = _launcher_environment(only=MPI_LAUNCHERS)
    if launcher and launcher[3] is not None:
        return launcher[3]
    from mpi4py import MPI

    return mpi_comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()


def _env_int(name):
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def _pick(flag, value, launcher, index, init_method):
    """A flag's value, else the launcher environment's; one line naming both when neither is there."""
    if value is not None:
        return value
    if launcher is None:
        raise ValueError(f"-pi {init_method} needs {flag}, or a launcher's environment (torchrun, mpirun, srun)")
    return launcher[index]


def _visible_gpus(device):
    return max(1, torch.cuda.device_count()) if device.type == "cuda" else 1


def _mpi_world():
    """mpi4py's COMM_WORLD when mpi4py is installed (importing it initialises MPI), else None."""
    try:
        from mpi4py import MPI
    except ImportError:
        return None
    return MPI.COMM_WORLD


def _rendezvous_url(init_method, server_ip, fs_path, rank, mpi_comm):
    if init_method == "env":
        for name in ("MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"-pi env needs {name} in the environment: start with torchrun")
        return "env://"
    if init_method == "tcp":
        if not server_ip:
            raise ValueError("-pi tcp needs -ps/--server_ip, the address of rank 0's host (HOST or HOST:PORT)")
        host, port = _host_port(server_ip)
        return f"tcp://{host}:{port or DEFAULT_PORT}"
    if init_method == "fs":
        if not fs_path:
            raise ValueError("-pi fs needs -pf/--fs_path, a folder on a file system that every process sees")
        try:
            os.makedirs(fs_path, exist_ok=True)
        except OSError as e:
            raise ValueError(f"-pf/--fs_path {fs_path}: cannot make the folder ({e.strerror})") from None
        # torch's file rendezvous needs a file no earlier run has used (one that crashed leaves its file behind):
        # under Slurm the job id makes each job's name new; otherwise remove a stale file by hand
        name = "llmpy_rendezvous" + (f"_{os.environ['SLURM_JOB_ID']}" if "SLURM_JOB_ID" in os.environ else "")
        return "file://" + os.path.abspath(os.path.join(fs_path, name))
    # mpi: rank 0 names the address; with mpi4py it also picks a free port and tells everyone
    host, port = _host_port(server_ip) if server_ip else (os.environ.get("MASTER_ADDR"), None)
    port = port or (int(os.environ["MASTER_PORT"]) if "MASTER_PORT" in os.environ else None)
    if mpi_comm is None:
        if not host:
            raise ValueError("-pi mpi without mpi4py needs -ps/--server_ip or MASTER_ADDR (rank 0's address)")
        return f"tcp://{host}:{port or DEFAULT_PORT}"
    if rank == 0:
        host = host or _this_host_address()
        port = port or _free_port()
    host, port = mpi_comm.bcast((host, port), root=0)
    return f"tcp://{host}:{port}"


def _host_port(server_ip):
    """-ps HOST or HOST:PORT -> (host, port or None)."""
    host, _, port = server_ip.partition(":")
    if not host or (port and not port.isdigit()):
        raise ValueError(f"-ps/--server_ip {server_ip!r} is not HOST or HOST:PORT")
    return host, int(port) if port else None


def _this_host_address():
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        raise ValueError(f"-pi mpi: this host's name {socket.gethostname()!r} does not resolve to an address: "
                         f"pass rank 0's address with -ps/--server_ip") from None


def _free_port():
    """A TCP port nobody listens on now (the OS picks it); the rendezvous binds it a moment later."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _reason(error):
    """An exception's message on one line: its first, without gloo's [file:line] prefix and closing advice."""
    text = str(error).strip() or type(error).__name__
    text = re.sub(r"^\[[^\]]*\] ", "", text.splitlines()[0])
    return text.split(" This is typically caused by")[0]
