"""The training runtime: everything a step needs besides a model's own forward and backward, for any model family.

A family lists its parameters in a table (llmpy.params.ParamSpec, in its file's order). From that table alone the
runtime allocates, once, the flat buffers every step works on:
  params (P_pad,)  the weights in the run's dtype (bf16, or fp32 for tests); p[name] is a view of each tensor
  master (S,)      fp32 master weights of this rank's shard, which AdamW updates (None in fp32 runs: params are it)
  grads (P_pad,)   fp32 gradients; g[name] views them like params
  m, v (S,)        fp32 AdamW moments of this rank's shard
and does what is the same for every model: setting and gathering the weights, starting a step's gradients from
zero, summing them over the ranks (all-reduce, or reduce-scatter under ZeRO-1), the global norm and its clip scale,
AdamW on this rank's shard, the optimizer state a checkpoint saves, the second stream a backward's weight gradients
run on, and replaying a micro-batch from a CUDA graph. The model (llmpy/models/) works on the views p and g.

One buffer per role means one collective for the gradients, one launch for the global norm, one for AdamW over
every parameter (weight decay by segments of the buffer), one copy for a checkpoint; and a step allocates nothing,
which is also what lets a CUDA graph replay it.
"""

import contextlib
import math

import numpy as np
import torch

from . import vendor
from .distributed import Dist
from .kernels import adamw, norm
from .params import param_shapes, split_flat


class Runtime:
    def __init__(self, table, dtype=torch.bfloat16, device="cuda", dist=None, zero_stage=0, cuda_graphs=False,
                 deterministic=False):
        """table: the family's parameter table. dist: the ranks (Dist(): one plain process). zero_stage 0 or 1.
        cuda_graphs: replay micro-batches from CUDA graphs (GPU only). deterministic: the vendors' deterministic
        choices (vendor.set_deterministic), so that a run repeats bit for bit on the GPU."""
        if zero_stage not in (0, 1):
            raise ValueError(f"-z/--zero_stage must be 0 or 1, not {zero_stage}")
        self.table = table
        self.dtype, self.device = dtype, torch.device(device)
        if self.device.type == "cuda":
            vendor.set_deterministic(deterministic)
        self.dist, self.zero_stage = dist if dist is not None else Dist(), zero_stage
        self.num_parameters = P = sum(math.prod(spec.shape) for spec in table)
        # Data parallel: every rank holds all parameters and gradients. -z 0: every rank also holds all master weights
        # and moments and updates everything. -z 1 (ZeRO stage 1): params and grads are padded to P_pad, a multiple
        # of the world size (the padding's gradient is zero, so it stays zero), and this rank updates only its shard,
        # [shard.start, shard.stop) of P_pad, holding the master weights and moments of that shard only.
        world, rank = (self.dist.world_size, self.dist.rank) if zero_stage == 1 else (1, 0)
        P_pad = -(-P // world) * world
        shard_size = P_pad // world
        self.shard = slice(rank * shard_size, (rank + 1) * shard_size)
        f32 = dict(dtype=torch.float32, device=self.device)
        self.params = torch.zeros(P_pad, dtype=dtype, device=self.device)
        self.master = torch.zeros(shard_size, **f32) if dtype != torch.float32 else None
        self.grads = torch.zeros(P_pad, **f32)
        self.m, self.v = torch.zeros(shard_size, **f32), torch.zeros(shard_size, **f32)
        shapes = param_shapes(table)
        self.p = split_flat(shapes, self.params[:P])  # name -> view, e.g. p["qkvw"] is GPT-2's (L, 3C, C)
        self.g = split_flat(shapes, self.grads[:P])
        # a step's first backward writes the matmul weights' gradients (over 99% of the buffer): only the others
        # are zeroed (start_gradients), and the gigabytes of zeros a large model's step would write are never written
        self._zeroed_grads = [self.g[spec.name] for spec in table if not spec.matmul_grad]
        self.norm_scratch = norm.global_norm_scratch(shard_size, self.device)
        self.grad_norm_sq = torch.zeros(1, **f32)
        self.grad_scale = torch.ones(1, **f32)
        self.hparams = torch.zeros(3, **f32)  # [lr, 1 - beta1^t, 1 - beta2^t]: read by the AdamW kernel on the device
        self.hparams_staging = torch.zeros(3).pin_memory() if self.device.type == "cuda" else None
        self.decay_segments = adamw.decay_segments(table, self.device, self.shard.start, self.shard.stop)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._graphs = {}  # replay's CUDA graphs by key (None: seen once, not yet captured)

    # ------------------------------------------------------------------------- weights

    def load_weights(self, flat):
        """Sets the weights from a flat fp32 array in the table's order, e.g. from llmpy.formats.read_model."""
        flat = torch.as_tensor(np.asarray(flat, dtype=np.float32))
        if flat.shape != (self.num_parameters,):
            raise ValueError(f"weights have {flat.numel()} values, the model needs {self.num_parameters}")
        self.params[:self.num_parameters].copy_(flat)  # rounds to nearest in bf16
        if self.master is not None:  # this rank's shard (all of them under -z 0); the padding past P stays zero
            in_range = flat[self.shard.start:self.shard.stop]
            self.master[:in_range.numel()].copy_(in_range)

    def weights_fp32(self):
        """The fp32 weights as a flat numpy array, for writing a model file.

        Under -z 1 with master weights each rank holds a shard of them, gathered here: every rank must call this.
        """
        P = self.num_parameters
        if self.master is None:
            return self.params[:P].float().cpu().numpy()
        if self.zero_stage == 0:
            return self.master.cpu().numpy()
        gathered = torch.zeros(self.params.numel(), dtype=torch.float32, device=self.device)
        gathered[self.shard] = self.master
        self.dist.all_gather_(gathered, "the master weights")
        return gathered[:P].cpu().numpy()

    # ------------------------------------------------------------------------- gradients and update

    def start_gradients(self):
        """Zeroes the gradients a step's first backward accumulates into (not the matmul-written ones: that
        backward writes them)."""
        for grad in self._zeroed_grads:
            grad.zero_()

    def reduce_gradients(self):
        """Sums the gradients over the ranks and leaves the squared global gradient norm (before clipping) in
        grad_norm_sq, on the device: nothing here waits for the GPU (NCCL's collectives are queued on the stream like
        kernels). Every micro-batch's dloss is 1 / (the step's tokens over all ranks), so the sum over ranks is the
        gradient of the step's mean loss (a sum, not torch's AVG: gloo has no AVG).

        -z 0 is one all-reduce of the whole fp32 buffer after the last micro-batch's backward. NCCL pipelines a
        buffer this large in chunks of its own, so splitting it into buckets only pays if the buckets' all-reduces
        overlap the backward; whether that wins over the launches and the contention it adds is to be measured on
        multi-GPU machines first.
        """
        if self.zero_stage == 1:
            grads = self.dist.reduce_scatter_sum_(self.grads, "the gradients")
        else:
            self.dist.all_reduce_sum_(self.grads, "the gradients")
            grads = self.grads
        norm.global_norm_squared(self.grad_norm_sq, grads, self.norm_scratch)
        if self.zero_stage == 1:  # each rank summed the squares of its shard; the padding adds zeros
            self.dist.all_reduce_sum_(self.grad_norm_sq, "the gradient norm")

    def update(self, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0):
        """After reduce_gradients: the clipping scale and AdamW over this rank's shard (step counts from 1), then
        under -z 1 every rank's updated parameters to every rank. A step whose update is skipped (the outlier
        guard) just does not call this."""
        norm.clip_scale(self.grad_scale, self.grad_norm_sq, grad_clip)
        adamw.set_adamw_hparams(self.hparams, lr, step, beta1, beta2, self.hparams_staging)
        adamw.adamw_update(self.params[self.shard], self.master, self.grads[self.shard], self.m, self.v, self.hparams,
                           self.grad_scale, beta1, beta2, eps, weight_decay, self.decay_segments)
        if self.zero_stage == 1:  # every rank's updated parameters (bf16, or fp32 in fp32 runs) to every rank
            self.dist.all_gather_(self.params, "the updated parameters")

    def clip_and_update(self, lr, step, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0):
        """reduce_gradients, then update: the step's optimizer work, all on the device."""
        self.reduce_gradients()
        self.update(lr, step, beta1, beta2, eps, weight_decay, grad_clip)

    def optimizer_state(self):
        """This rank's shard of the AdamW state, device fp32 tensors: {"m", "v", "master"} (master None in fp32 runs,
        where the parameters are the master weights)."""
        return {"m": self.m, "v": self.v, "master": self.master}

    def load_optimizer_state(self, m, v, master=None):
        """Sets this rank's shard of the AdamW state from host fp32 arrays (a checkpoint), after load_weights.
        master None keeps the master weights load_weights took from the weights; in an fp32 run, given master
        weights become the parameters (the checkpoint's weights file may be their bf16 rounding)."""
        for target, source in ((self.m, m), (self.v, v)):
            target.copy_(torch.from_numpy(np.asarray(source, dtype=np.float32)))
        if master is None:
            return
        master = torch.from_numpy(np.asarray(master, dtype=np.float32))
        if self.master is not None:
            self.master.copy_(master)
            return
        self.params[self.shard].copy_(master)
        if self.zero_stage == 1:
            self.dist.all_gather_(self.params, "the restored parameters")

    # ------------------------------------------------------------------------- streams and graphs

    @contextlib.contextmanager
    def beside(self):
        """Runs the block's launches on the side stream, after everything launched so far on the current stream,
        and yields the event that marks their end (None without the stream: they run in line). A backward puts its
        weight gradients' matmuls here: nothing waits for them, so they fill the SMs the chain of input gradients
        leaves idle (a matmul's last, partly filled wave of tiles); the chain waits on the event (wait) only before it
        overwrites what they read."""
        if self.side_stream is None:
            yield None
            return
        done = torch.cuda.Event()
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            yield done
        done.record(self.side_stream)

    @staticmethod
    def wait(event):
        """The current stream waits for an event of beside (None: nothing to wait for)."""
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def wait_for_side_stream(self):
        if self.side_stream is not None:
            torch.cuda.current_stream().wait_stream(self.side_stream)

    def replay(self, key, run):
        """run(), through a CUDA graph when cuda_graphs is on: the first call for a key runs eagerly (it compiles
        the kernels and lets cuBLAS and cuDNN choose their plans, which a capture cannot), the second captures run
        into a graph, and every later one replays it, so the GPU no longer waits for Python between kernels. A graph
        replays the same kernels on the same buffers with the same arguments: run must read everything that
        changes between calls from device memory, and key must tell apart the calls that launch differently."""
        if not self.cuda_graphs:
            run()
            return
        if key not in self._graphs:
            run()
            self._graphs[key] = None
            return
        if self._graphs[key] is None:
            self._graphs[key] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graphs[key]):
                run()
        self._graphs[key].replay()
