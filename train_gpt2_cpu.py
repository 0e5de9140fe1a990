"""GPT-2 training on the CPU in fp32 NumPy: the reference trainer, in the spirit of llm.c's train_gpt2.c.

Every layer has a forward and a backward function, written out with the shapes in the comments. The model's
parameters live in one flat float32 buffer (llm.c's order, llmpy.configs.gpt2.split_params gives the per-tensor views),
the gradients in a second, the AdamW moments in two more, so the optimizer is one pass over flat buffers.

Notation: B batch size, T sequence length, N = B*T rows, C channels, NH heads, hs = C/NH head size, L layers,
V vocabulary (50257), Vp padded vocabulary (50304; wte's extra rows are zero and their logits are ignored).

Speed. A d12 step at B=4, T=64 is ~190 GFLOP of matmuls, which BLAS (np.matmul on 2-D float32 arrays) runs in
~0.75 s on two cores. Everything else must cost much less than that, so:
  - every buffer is allocated once per (B, T) and NumPy writes into it with out=: a fresh temporary costs page
    faults on every use, which for the (N, C) layernorm temporaries alone was half of the layernorm's time;
  - big elementwise work is done in place, a pass at a time, with no Python loop over tokens or channels;
  - the backward writes every parameter gradient before anything adds to it, so the gradients need no zeroing;
  - NumPy's elementwise loops use one core, so GELU, attention and the softmax split their rows over two threads
    (on_both_cores), and AdamW runs over cache-sized chunks of the flat buffers on two threads.

The functions take their outputs as arguments and use the dtype of their inputs, so the tests can run them in
float64 against PyTorch's autograd. The trainer itself is float32 throughout.

Run: python train_gpt2_cpu.py                (gpt2_124M.bin, tiny Shakespeare, 40 steps of B=4, T=64)
     python train_gpt2_cpu.py --model d12    (the same from a random GPT-2 initialisation)
"""

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# After a matmul OpenBLAS's worker thread spins for ~0.1 s waiting for the next one, holding a core that the
# elementwise work on our second thread (on_both_cores, AdamW) needs: ~100 ms a step. Let it sleep at once instead
# (2^4 cycles). Read when NumPy loads OpenBLAS, so this has no effect if NumPy was imported before this module.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import numpy as np  # noqa: E402 (after the environment variable above)

from llmpy import cli
from llmpy.configs.gpt2 import (GPT2_EOT, config_from_descriptor, gpt2_init, is_descriptor, num_parameters, param_table,
                                split_params)
from llmpy.data import DataLoader
from llmpy.formats import FormatError
from llmpy.hf import is_hf_source, load_weights
from llmpy.params import decay_runs
from llmpy.signals import DeferredInterrupts, exit_quietly
from llmpy.tokenizer import Tokenizer

PROG = os.path.basename(sys.argv[0])

LAYERNORM_EPS = 1e-5
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715


def encoder_forward(out, tokens, wte, wpe):
    """out (B, T, C) = wte[tokens] + wpe[:T]: each token's embedding plus its position's."""
    T = tokens.shape[1]
    np.take(wte, tokens, axis=0, out=out)  # tokens (B, T) int, wte (Vp, C)
    out += wpe[:T]  # wpe (maxT, C), broadcast over the batch


def encoder_backward(dwte, dwpe, dout, tokens):
    """Adds dout (B, T, C) into the rows of dwte (Vp, C) the tokens picked; writes dwpe (maxT, C).

    dwte already holds the LM head's gradient (wte is tied), so this accumulates; a token that appears twice
    gets both rows' gradients (np.add.at, unlike dwte[tokens] += dout, sums repeated indices).
    """
    B, T, C = dout.shape
    np.add.at(dwte, tokens.reshape(-1), dout.reshape(B * T, C))
    np.sum(dout, axis=0, out=dwpe[:T])
    dwpe[T:] = 0  # positions beyond T were not used


def layernorm_forward(out, mean, rstd, inp, weight, bias):
    """out (N, C) = (inp - mean) * rstd * weight + bias over each row; saves mean and rstd (N,) for the backward."""
    np.mean(inp, axis=1, out=mean)
    np.subtract(inp, mean[:, None], out=out)  # centred, built up in place in out
    variance = np.einsum("nc,nc->n", out, out) / inp.shape[1]  # biased, as in GPT-2 and PyTorch
    np.divide(1.0, np.sqrt(variance + LAYERNORM_EPS), out=rstd)
    out *= rstd[:, None]
    out *= weight
    out += bias


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, norm, dnorm):
    """Adds the input gradient into dinp (N, C); writes dweight, dbias (C,). norm, dnorm: (N, C) scratch.

    dinp accumulates because a layernorm's input is the residual stream, whose gradient also arrives unchanged
    through the skip connection. With norm = (inp - mean) * rstd and dnorm = dout * weight:
        dinp += rstd * (dnorm - mean_c(dnorm) - norm * mean_c(dnorm * norm))
    """
    C = inp.shape[1]
    np.subtract(inp, mean[:, None], out=norm)  # recomputed from mean and rstd rather than stored
    norm *= rstd[:, None]
    np.einsum("nc,nc->c", dout, norm, out=dweight)
    np.sum(dout, axis=0, out=dbias)
    np.multiply(dout, weight, out=dnorm)
    dnorm_mean = np.mean(dnorm, axis=1, keepdims=True)  # (N, 1)
    dnorm_norm_mean = np.einsum("nc,nc->n", dnorm, norm)[:, None] / C
    norm *= dnorm_norm_mean
    dnorm -= norm
    dnorm -= dnorm_mean
    dnorm *= rstd[:, None]
    dinp += dnorm


def matmul_forward(out, inp, weight, bias):
    """out (N, OC) = inp (N, IC) @ weight.T + bias. weight is (OC, IC) as in llm.c's files; bias (OC,) or None."""
    np.matmul(inp, weight.T, out=out)  # BLAS reads the transposed view in place
    if bias is not None:
        out += bias


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    """Given dout (N, OC): writes dinp (N, IC) = dout @ weight, dweight (OC, IC) = dout.T @ inp, dbias = sum(dout)."""
    np.matmul(dout, weight, out=dinp)
    np.matmul(dout.T, inp, out=dweight)  # straight into the view of the flat gradient buffer
    if dbias is not None:
        np.sum(dout, axis=0, out=dbias)


def split_heads(qkv, NH):
    """qkv (B, T, 3C) -> q, k, v: views of shape (B, NH, T, hs), no copy."""
    B, T, C3 = qkv.shape
    return qkv.reshape(B, T, 3, NH, C3 // (3 * NH)).transpose(2, 0, 3, 1, 4)


def merge_heads_view(x, NH):
    """x (B, T, C) seen as (B, NH, T, hs): a view, so matmul can write each head's output straight into x."""
    B, T, C = x.shape
    return x.reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)


def attention_forward(out, att, qkv, NH):
    """Causal multi-head self-attention. qkv (B, T, 3C) -> out (B, T, C); saves att (B, NH, T, T), the
    attention probabilities (row t: how much position t attends to each position <= t)."""
    q, k, v = split_heads(qkv, NH)  # each (B, NH, T, hs)
    T, hs = q.shape[2], q.shape[3]
    np.matmul(q, k.swapaxes(-1, -2), out=att)  # (B, NH, T, T) batched over B*NH heads
    att *= 1.0 / math.sqrt(hs)
    np.copyto(att, -np.inf, where=np.triu(np.ones((T, T), dtype=bool), k=1))  # no attending to the future
    att -= att.max(axis=-1, keepdims=True)  # the diagonal is never masked, so every row has a finite max
    np.exp(att, out=att)  # masked entries become exactly 0
    att /= att.sum(axis=-1, keepdims=True)
    np.matmul(att, v, out=merge_heads_view(out, NH))  # (B, NH, T, hs), written as (B, T, NH, hs) = (B, T, C)


def attention_backward(dqkv, datt, dout, qkv, att, NH):
    """Given dout (B, T, C): writes dqkv (B, T, 3C). datt (B, NH, T, T) is scratch."""
    q, k, v = split_heads(qkv, NH)
    dq, dk, dv = split_heads(dqkv, NH)
    dout_heads = merge_heads_view(dout, NH)  # (B, NH, T, hs)
    # out = att @ v
    np.matmul(dout_heads, v.swapaxes(-1, -2), out=datt)
    np.matmul(att.swapaxes(-1, -2), dout_heads, out=dv)
    # softmax backward, row by row: dpreatt = att * (datt - sum_j att_j datt_j); masked entries have att = 0
    datt -= np.einsum("bhij,bhij->bhi", att, datt)[..., None]
    datt *= att
    datt *= 1.0 / math.sqrt(q.shape[-1])  # preatt = q @ k.T / sqrt(hs)
    np.matmul(datt, k, out=dq)
    np.matmul(datt.swapaxes(-1, -2), q, out=dk)


def gelu_forward(out, inp):
    """out = 0.5 x (1 + tanh(s (x + 0.044715 x^3))), s = sqrt(2/pi): GPT-2's tanh approximation of GELU.

    Built up in place in out, one pass at a time, so an (N, 4C) input makes no (N, 4C) temporaries.
    """
    np.multiply(inp, inp, out=out)  # x^2
    out *= GELU_SCALE * GELU_CUBIC
    out += GELU_SCALE
    out *= inp  # u = s (x + 0.044715 x^3)
    np.tanh(out, out=out)
    out += 1
    out *= inp
    out *= 0.5


def gelu_backward(dinp, inp, dout, x_dudx, t):
    """dinp = dout * gelu'(x); dinp may be dout itself. x_dudx, t: scratch of inp's shape.

    With u = s (x + 0.044715 x^3) and t = tanh(u):
        gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) du/dx = 0.5 (1 + t) (1 + x du/dx (1 - t))
    which needs tanh once and nothing else transcendental.
    """
    np.multiply(inp, inp, out=x_dudx)  # x^2
    np.multiply(x_dudx, GELU_SCALE * GELU_CUBIC, out=t)
    t += GELU_SCALE
    t *= inp
    np.tanh(t, out=t)
    x_dudx *= 3 * GELU_SCALE * GELU_CUBIC
    x_dudx += GELU_SCALE
    x_dudx *= inp  # x du/dx = x s (1 + 3 * 0.044715 x^2)
    t += 1  # 1 + t
    np.multiply(dout, t, out=dinp)
    np.subtract(2, t, out=t)  # 1 - t
    x_dudx *= t
    x_dudx += 1
    dinp *= x_dudx
    dinp *= 0.5


def residual_forward(out, inp1, inp2):
    """out = inp1 + inp2. The backward is the identity into both inputs, so GPT2.backward hands the same
    gradient buffer to both branches instead of copying it."""
    np.add(inp1, inp2, out=out)


def softmax_crossentropy_forward(probs, losses, logits, targets, V):
    """losses (N,) = -log softmax(logits)[target] for each row. logits, probs (N, Vp); targets (N,) int.

    Only the first V columns are tokens: the padded columns are left out of the softmax and their probs stay
    0 (they are zeroed once, when the buffer is made). Writes the softmax into probs, which the backward
    turns into dlogits in place.
    """
    real_logits, real_probs = logits[:, :V], probs[:, :V]
    maxes = real_logits.max(axis=1, keepdims=True)  # (N, 1); subtracted so exp cannot overflow
    np.subtract(real_logits, maxes, out=real_probs)
    np.exp(real_probs, out=real_probs)
    sums = real_probs.sum(axis=1, keepdims=True)
    real_probs /= sums
    rows = np.arange(len(targets))
    np.subtract(np.log(sums[:, 0]), logits[rows, targets] - maxes[:, 0], out=losses)  # -log(exp(l_y - max) / sum)


def softmax_crossentropy_backward(dlogits, targets):
    """dlogits (N, Vp): turns the probs the forward left there into the gradient of the mean loss over the N
    rows, (probs - onehot(target)) / N. The padded columns' probs are 0, so their gradient is 0."""
    N = len(targets)
    dlogits *= 1.0 / N
    dlogits[np.arange(N), targets] -= 1.0 / N


WORKER = ThreadPoolExecutor(max_workers=1)


def in_parallel(there, here):
    """Runs there() in the worker thread and here() in this one, at once, and returns when both are done. NumPy
    releases the GIL in its loops, so both cores work. A Ctrl-C or SIGTERM meanwhile is raised after both, not
    inside the wait for the worker, where it could leave the future's lock held and the worker unable to finish."""
    with DeferredInterrupts():
        future = WORKER.submit(there)
        here()
        future.result()


def on_both_cores(layer, *arrays, **constants):
    """layer(*arrays, **constants), run as two calls at once: one on the first half of every array's rows (axis
    0) in the worker thread, one on the second half here. Only for layers that treat rows independently and that
    BLAS does not already parallelise."""
    half = len(arrays[0]) // 2
    if half == 0:
        return layer(*arrays, **constants)
    in_parallel(lambda: layer(*(a[:half] for a in arrays), **constants),
                lambda: layer(*(a[half:] for a in arrays), **constants))


class Activations:
    """Every activation of one forward pass at batch size B and length T, kept for the backward, plus the
    buffers the backward reuses layer after layer. Allocated once per (B, T)."""

    def __init__(self, config, B, T, dtype=np.float32):
        L, C, NH, Vp = config.num_layers, config.channels, config.num_heads, config.padded_vocab_size
        N = B * T
        self.B, self.T = B, T
        self.encoded = np.empty((B, T, C), dtype)
        self.ln1 = np.empty((L, N, C), dtype)
        self.ln1_mean, self.ln1_rstd = np.empty((L, N), dtype), np.empty((L, N), dtype)
        self.qkv = np.empty((L, N, 3 * C), dtype)
        self.att = np.empty((L, B, NH, T, T), dtype)  # attention probabilities
        self.atty = np.empty((L, N, C), dtype)  # attention output, heads merged
        self.attproj = np.empty((L, N, C), dtype)
        self.residual2 = np.empty((L, N, C), dtype)
        self.ln2 = np.empty((L, N, C), dtype)
        self.ln2_mean, self.ln2_rstd = np.empty((L, N), dtype), np.empty((L, N), dtype)
        self.fch = np.empty((L, N, 4 * C), dtype)
        self.fch_gelu = np.empty((L, N, 4 * C), dtype)
        self.fcproj = np.empty((L, N, C), dtype)
        self.residual3 = np.empty((L, N, C), dtype)  # each layer's output
        self.lnf = np.empty((N, C), dtype)
        self.lnf_mean, self.lnf_rstd = np.empty(N, dtype), np.empty(N, dtype)
        self.logits = np.empty((N, Vp), dtype)
        self.probs = np.zeros((N, Vp), dtype)  # also dlogits in the backward; padded columns stay 0
        self.losses = np.empty(N, dtype)
        # backward buffers, reused by every layer
        self.dresidual = np.empty((N, C), dtype)  # gradient of the residual stream
        self.dln = np.empty((N, C), dtype)  # gradient of a layernorm's output
        self.datty = np.empty((N, C), dtype)
        self.dqkv = np.empty((N, 3 * C), dtype)
        self.datt = np.empty((B, NH, T, T), dtype)
        self.dfch = np.empty((N, 4 * C), dtype)  # gradient of fch_gelu, then (in place) of fch
        self.gelu_scratch = np.empty((2, N, 4 * C), dtype)
        self.layernorm_scratch = np.empty((2, N, C), dtype)


class GPT2:
    """A GPT-2 model: flat parameter, gradient and AdamW moment buffers, and the activations of the last forward.

    model.forward(tokens, targets) -> mean loss; model.backward(); model.update(lr, ..., step) is one step.
    """

    def __init__(self, config, params):
        # float32 in the trainer; the tests also run the whole model in float64
        if params.dtype not in (np.float32, np.float64) or params.shape != (num_parameters(config),):
            raise ValueError(f"parameters must be float32 (or float64) of shape ({num_parameters(config)},), "
                             f"got {params.dtype} {params.shape}")
        self.config = config
        self.params = np.ascontiguousarray(params)
        self.param = split_params(config, self.params)  # name -> view
        # the backward writes every gradient, so the buffer is never zeroed; np.empty leaves its pages untouched
        self.grads = np.empty_like(self.params)
        self.grad = split_params(config, self.grads)
        self.adam_m = self.adam_v = None  # allocated at the first update, as in llm.c
        self.adam_chunks = None
        self.acts = None  # those of the last forward
        self.acts_by_shape = {}  # (B, T) -> Activations: training batches and sampling rows keep their own
        self.tokens = self.targets = None  # the last forward's batch

    def activations(self, B, T):
        """The activation buffers for (B, T), allocated at the first forward of that shape."""
        if (B, T) not in self.acts_by_shape:
            self.acts_by_shape[B, T] = Activations(self.config, B, T, self.params.dtype)
        self.acts = self.acts_by_shape[B, T]
        return self.acts

    def forward(self, tokens, targets=None):
        """tokens, targets (B, T) int. Leaves the logits in self.acts.logits (B*T, Vp); returns the mean loss
        (None without targets)."""
        cfg, p = self.config, self.param
        B, T = tokens.shape
        if T > cfg.max_seq_len:
            raise ValueError(f"sequence length T={T} exceeds the model's max_seq_len {cfg.max_seq_len}")
        if tokens.min() < 0 or tokens.max() >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}): got [{tokens.min()}, {tokens.max()}]")
        a = self.activations(B, T)
        N, C, NH = B * T, cfg.channels, cfg.num_heads
        self.tokens, self.targets = tokens, targets

        encoder_forward(a.encoded, tokens, p["wte"], p["wpe"])
        residual = a.encoded.reshape(N, C)
        for l in range(cfg.num_layers):
            layernorm_forward(a.ln1[l], a.ln1_mean[l], a.ln1_rstd[l], residual, p["ln1w"][l], p["ln1b"][l])
            matmul_forward(a.qkv[l], a.ln1[l], p["qkvw"][l], p["qkvb"][l])
            on_both_cores(attention_forward, a.atty[l].reshape(B, T, C), a.att[l], a.qkv[l].reshape(B, T, 3 * C), NH=NH)
            matmul_forward(a.attproj[l], a.atty[l], p["attprojw"][l], p["attprojb"][l])
            residual_forward(a.residual2[l], residual, a.attproj[l])
            layernorm_forward(a.ln2[l], a.ln2_mean[l], a.ln2_rstd[l], a.residual2[l], p["ln2w"][l], p["ln2b"][l])
            matmul_forward(a.fch[l], a.ln2[l], p["fcw"][l], p["fcb"][l])
            on_both_cores(gelu_forward, a.fch_gelu[l], a.fch[l])
            matmul_forward(a.fcproj[l], a.fch_gelu[l], p["fcprojw"][l], p["fcprojb"][l])
            residual_forward(a.residual3[l], a.residual2[l], a.fcproj[l])
            residual = a.residual3[l]
        layernorm_forward(a.lnf, a.lnf_mean, a.lnf_rstd, residual, p["lnfw"], p["lnfb"])
        matmul_forward(a.logits, a.lnf, p["wte"], None)  # the LM head is tied to the token embedding
        if targets is None:
            return None
        on_both_cores(softmax_crossentropy_forward, a.probs, a.losses, a.logits, targets.reshape(N), V=cfg.vocab_size)
        return float(a.losses.mean(dtype=np.float64))

    def backward(self):
        """Writes every parameter gradient of the last forward's mean loss into self.grads."""
        if self.targets is None:
            raise RuntimeError("backward needs a forward with targets first")
        cfg, p, g, a = self.config, self.param, self.grad, self.acts
        B, T, N, C, NH, L = a.B, a.T, a.B * a.T, cfg.channels, cfg.num_heads, cfg.num_layers

        dlogits = a.probs
        softmax_crossentropy_backward(dlogits, self.targets.reshape(N))
        matmul_backward(a.dln, g["wte"], None, dlogits, a.lnf, p["wte"])
        dresidual = a.dresidual
        dresidual[...] = 0
        layernorm_backward(dresidual, g["lnfw"], g["lnfb"], a.dln, a.residual3[L - 1], p["lnfw"], a.lnf_mean,
                           a.lnf_rstd, *a.layernorm_scratch)
        for l in reversed(range(L)):
            residual = a.encoded.reshape(N, C) if l == 0 else a.residual3[l - 1]
            # residual3 = residual2 + fcproj: dresidual is the gradient of both (residual_forward's docstring)
            matmul_backward(a.dfch, g["fcprojw"][l], g["fcprojb"][l], dresidual, a.fch_gelu[l], p["fcprojw"][l])
            on_both_cores(gelu_backward, a.dfch, a.fch[l], a.dfch, *a.gelu_scratch)
            matmul_backward(a.dln, g["fcw"][l], g["fcb"][l], a.dfch, a.ln2[l], p["fcw"][l])
            layernorm_backward(dresidual, g["ln2w"][l], g["ln2b"][l], a.dln, a.residual2[l], p["ln2w"][l],
                               a.ln2_mean[l], a.ln2_rstd[l], *a.layernorm_scratch)
            # residual2 = residual + attproj: again the same gradient for both
            matmul_backward(a.datty, g["attprojw"][l], g["attprojb"][l], dresidual, a.atty[l], p["attprojw"][l])
            on_both_cores(attention_backward, a.dqkv.reshape(B, T, 3 * C), a.datt, a.datty.reshape(B, T, C),
                          a.qkv[l].reshape(B, T, 3 * C), a.att[l], NH=NH)
            matmul_backward(a.dln, g["qkvw"][l], g["qkvb"][l], a.dqkv, a.ln1[l], p["qkvw"][l])
            layernorm_backward(dresidual, g["ln1w"][l], g["ln1b"][l], a.dln, residual, p["ln1w"][l],
                               a.ln1_mean[l], a.ln1_rstd[l], *a.layernorm_scratch)
        encoder_backward(g["wte"], g["wpe"], dresidual.reshape(B, T, C), self.tokens)
        self.targets = None  # the probs buffer now holds dlogits

    def update(self, learning_rate, beta1, beta2, eps, weight_decay, step):
        """One AdamW step (step counts from 1) over the flat buffers; weight decay only on the 2-D tensors."""
        if self.adam_m is None:
            self.adam_m = np.zeros_like(self.params)
            self.adam_v = np.zeros_like(self.params)
            self.adam_chunks = adamw_chunks(self.config)
        # every other chunk in the worker thread, the rest here: NumPy releases the GIL, so both cores work
        buffers = (self.params, self.grads, self.adam_m, self.adam_v)
        hyper = (learning_rate, beta1, beta2, eps, weight_decay, step)
        in_parallel(lambda: adamw_update(*buffers, self.adam_chunks[0::2], *hyper),
                    lambda: adamw_update(*buffers, self.adam_chunks[1::2], *hyper))


# 128K floats: a chunk of params, grads, both moments and a scratch (2.5 MB) stays in or near the L2 cache, and
# a step is only ~1000 chunks, so the Python overhead of ~12 NumPy calls per chunk stays small (measured best)
ADAMW_CHUNK = 1 << 17


def adamw_chunks(config, chunk=ADAMW_CHUNK):
    """(start, end, decay) ranges over the flat buffer: runs of tensors that all get weight decay (2-D) or
    all do not, cut into chunks of at most `chunk` elements."""
    return [(lo, min(lo + chunk, end), decay) for start, end, decay in decay_runs(param_table(config))
            for lo in range(start, end, chunk)]


def adamw_update(params, grads, m, v, chunks, learning_rate, beta1, beta2, eps, weight_decay, step):
    """AdamW (Loshchilov & Hutter; PyTorch's torch.optim.AdamW) over the given chunks of the flat buffers:
        m = beta1 m + (1 - beta1) g            v = beta2 v + (1 - beta2) g^2
        p -= lr wd p   (decayed tensors only)  p -= lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
    The last line is computed as p -= step_size * m / (sqrt(v) + eps * sqrt(1 - beta2^t)) with
    step_size = lr sqrt(1 - beta2^t) / (1 - beta1^t): the same value, one pass fewer.
    """
    correction2 = math.sqrt(1.0 - beta2 ** step)
    step_size = learning_rate * correction2 / (1.0 - beta1 ** step)
    denominator_eps = eps * correction2
    scratch = np.empty(max((hi - lo for lo, hi, _ in chunks), default=0), dtype=params.dtype)
    for lo, hi, decay in chunks:
        p, g, m_, v_, tmp = params[lo:hi], grads[lo:hi], m[lo:hi], v[lo:hi], scratch[:hi - lo]
        if decay and weight_decay:
            p *= 1.0 - learning_rate * weight_decay
        m_ *= beta1
        np.multiply(g, 1.0 - beta1, out=tmp)
        m_ += tmp
        v_ *= beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - beta2
        v_ += tmp
        np.sqrt(v_, out=tmp)
        tmp += denominator_eps
        np.divide(m_, tmp, out=tmp)
        tmp *= step_size
        p -= tmp


def validation_loss(model, loader, num_batches):
    """The mean loss of num_batches batches from the start of the loader."""
    loader.reset()
    return sum(model.forward(*loader.next_batch()) for _ in range(num_batches)) / num_batches


def sample_tokens(model, length, rng):
    """A row of `length` tokens (llm.c's genT) starting with <|endoftext|>: returns the length - 1 tokens sampled
    after it, each drawn from the softmax of the model's logits with the seeded rng.

    Each token runs the forward on the whole (1, length) row: positions after the current one hold <|endoftext|>
    filler, which causal attention keeps from affecting the position being read.
    """
    cfg = model.config
    length = min(length, cfg.max_seq_len)
    row = np.full((1, length), GPT2_EOT, dtype=np.int32)
    for t in range(1, length):
        model.forward(row)
        logits = model.acts.logits[t - 1, :cfg.vocab_size].astype(np.float64)
        probs = np.exp(logits - logits.max())
        cdf = np.cumsum(probs / probs.sum())
        row[0, t] = min(np.searchsorted(cdf, rng.random(), side="right"), cfg.vocab_size - 1)  # llm.c's sample_mult
    return row[0, 1:]


def load_model(arg, seed):
    """--model: an llm.c model file, a Hugging Face GPT-2 (gpt2 ... gpt2-xl, or a folder: llmpy/hf.py), or a
    descriptor (d12, tiny, ...) for GPT-2's seeded random initialisation: weights N(0, 0.02), the residual
    projections N(0, 0.02/sqrt(2L)), biases 0, layernorms 1 and 0."""
    if is_hf_source(arg) or os.path.exists(arg):
        return load_weights(arg)
    if not is_descriptor(arg):
        raise FormatError(arg, "file not found (write it with: python train_gpt2_torch.py --model d12 "
                               "--write_tensors 1), and not a model descriptor like d12 or tiny")
    try:
        config = config_from_descriptor(arg)
    except ValueError as e:  # a descriptor with impossible numbers, e.g. d2c65h4: the error says which
        raise ValueError(f"-e/--model: {e}") from None
    return config, gpt2_init(config, seed)


def parse_args(argv):
    ap = cli.OneLineArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-e", "--model", default="gpt2_124M.bin",
                    help="model file; gpt2|gpt2-medium|gpt2-large|gpt2-xl (OpenAI's weights from the Hugging Face "
                         "hub) or a Hugging Face GPT-2 folder; or a descriptor (d12, tiny, ...) for a random init")
    ap.add_argument("-i", "--input_bin", default="dev/data/tinyshakespeare/tiny_shakespeare_train.bin",
                    help="train shards (glob)")
    ap.add_argument("-j", "--input_val_bin", default="dev/data/tinyshakespeare/tiny_shakespeare_val.bin",
                    help="val shards (glob)")
    ap.add_argument("--tokenizer", default="gpt2_tokenizer.bin", help="llm.c tokenizer file, for decoding samples")
    ap.add_argument("-b", "--batch_size", type=int, default=4)
    ap.add_argument("-t", "--sequence_length", type=int, default=64)
    ap.add_argument("-x", "--max_steps", type=int, default=40,
                    help="optimizer steps; 0: only a validation loss and a sample")
    ap.add_argument("-l", "--learning_rate", type=float, default=1e-4)
    ap.add_argument("--beta1", type=float, default=0.9)
    ap.add_argument("--beta2", type=float, default=0.999)
    ap.add_argument("--eps", type=float, default=1e-8)
    ap.add_argument("-c", "--weight_decay", type=float, default=0.0)
    ap.add_argument("-v", "--val_loss_every", type=int, default=10, help="0: never")
    ap.add_argument("-m", "--val_max_steps", type=int, default=5, help="batches per validation")
    ap.add_argument("-s", "--sample_every", type=int, default=20, help="0: never")
    ap.add_argument("-g", "--gen_tokens", type=int, default=64,
                    help="length of a sample, the leading <|endoftext|> included")
    ap.add_argument("--seed", type=int, default=1337, help="for the random init and the sampling")
    args = ap.parse_args(argv)
    for flag in ("batch_size", "sequence_length", "gen_tokens", "val_max_steps"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("max_steps", "val_loss_every", "sample_every"):
        if getattr(args, flag) < 0:
            ap.error(f"--{flag} must not be negative, got {getattr(args, flag)}")
    for flag in ("learning_rate", "beta1", "beta2", "eps", "weight_decay"):
        if not math.isfinite(getattr(args, flag)):  # inf and nan would train to nan and still exit 0
            ap.error(f"--{flag} must be a finite number, got {getattr(args, flag)}")
    if not (args.learning_rate > 0 and 0 <= args.beta1 < 1 and 0 <= args.beta2 < 1 and args.eps > 0
            and args.weight_decay >= 0):
        ap.error("AdamW needs --learning_rate > 0, 0 <= --beta1, --beta2 < 1, --eps > 0, --weight_decay >= 0")
    return args


def train(args):
    config, params = load_model(args.model, args.seed)
    B, T = args.batch_size, args.sequence_length
    if T > config.max_seq_len:
        raise ValueError(f"-t {T}: longer than the model's max_seq_len {config.max_seq_len}")
    print(f"model {args.model}: {config.num_layers} layers, {config.num_heads} heads, {config.channels} channels, "
          f"max_seq_len {config.max_seq_len}, {num_parameters(config):,} parameters")
    model = GPT2(config, params)
    train_loader = DataLoader(args.input_bin, B, T, vocab_size=config.vocab_size)
    val_loader = DataLoader(args.input_val_bin, B, T, vocab_size=config.vocab_size) if args.val_loss_every else None
    print(f"train: {args.input_bin}, {train_loader.num_batches_per_epoch} batches of B={B}, T={T}")
    tokenizer = None
    if args.sample_every:
        try:
            tokenizer = Tokenizer(args.tokenizer)
        except FormatError as e:
            print(f"note: no tokenizer ({e}); samples are printed as token ids")
    sample_rng = np.random.default_rng(args.seed)

    for step in range(args.max_steps + 1):
        last_step = step == args.max_steps
        if args.val_loss_every and (step % args.val_loss_every == 0 or last_step):
            print(f"val loss {validation_loss(model, val_loader, args.val_max_steps):.6f}")
        # and at the last step, as llm.c: so -x 0 evaluates a model with a validation loss and a sample
        if args.sample_every and ((step > 0 and step % args.sample_every == 0) or last_step):
            tokens = sample_tokens(model, args.gen_tokens, sample_rng)
            text = tokenizer.decode(tokens) if tokenizer else " ".join(map(str, tokens))
            print(f"generating:\n---\n{text}\n---")
        if last_step:
            break
        x, y = train_loader.next_batch()
        t0 = time.perf_counter()
        loss = model.forward(x, y)
        t1 = time.perf_counter()
        model.backward()
        t2 = time.perf_counter()
        model.update(args.learning_rate, args.beta1, args.beta2, args.eps, args.weight_decay, step + 1)
        t3 = time.perf_counter()
        print(f"step {step + 1}/{args.max_steps}: train loss {loss:.6f} (took {(t3 - t0) * 1e3:.0f} ms: forward "
              f"{(t1 - t0) * 1e3:.0f}, backward {(t2 - t1) * 1e3:.0f}, update {(t3 - t2) * 1e3:.0f})")


def main(argv=None):
    args = parse_args(argv)
    with exit_quietly(PROG):
        try:
            train(args)
        except (FormatError, ValueError, OSError) as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        except MemoryError as e:  # NumPy's says how much it could not allocate, for which shape
            print(f"{PROG}: error: out of memory ({e}): use a smaller -b/--batch_size than {args.batch_size}",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
