"""GPT-2 inference with a KV cache, through the mainline's own kernels: a decoder for llmpy.sampling.generate.

Generating N tokens after a prompt with a full forward per token (llm.c's way, llmpy.sampling.FullForwardDecoder)
costs N forwards over the whole sequence: every layer recomputes the keys and values of every earlier token at every
step. They never change once computed (causal attention: a token's k and v depend on it and the tokens before it
only), so here they are computed once and kept, per layer, in a cache of shape (L, B, NH, maxT, HS) in the model's
dtype, and N new tokens cost one prefill plus N - 1 one-token steps:
- prefill(prompt): one forward over the T0 prompt tokens of a single row, the mainline's layers as training runs them
  (llmpy.models.gpt2.layer_forward: encoder, layernorm, cuBLASLt matmuls, GELU, our causal flash attention). Each layer's
  keys and values, straight from its qkv output, are copied into positions [0, T0) of every row's cache: the B rows
  (samples) continue the same prompt. The LM head runs on the last position only.
- decode(tokens): one new token per row, at position t (the cache's length). The same layers over B rows, with the
  attention of llmpy.kernels.decode_attention: the new token's query against the row's t cached keys and its own,
  which also appends its key and value to the cache.
Activations are not kept: every layer reuses one set of buffers of N rows (T0 for the prefill, B for a step).

On the GPU a decode step is a fixed sequence of 8 launches a layer whose arguments never change: what changes (the
new tokens and the position t) is read from device buffers, written before the step. So, as the training step is,
it is captured into a CUDA graph at its second call (the first compiles the kernels and lets cuBLASLt time its
algorithms, which a capture cannot) and replayed from then on, without Python between the kernels.

The MLP's GELU is our kernel, not the fc matmul's cuBLASLt epilogue as in training on Hopper: at a step's B rows it is
a tiny pass (B x 4C values), and the model then does not depend on cuBLASLt offering that epilogue for so few rows.
"""

import numpy as np
import torch

from . import vendor
from .configs.gpt2 import num_parameters, split_params
from .kernels import attention, encoder, layernorm
from .kernels.decode_attention import decode_attention
from .models import gpt2
from .models.gpt2 import LayerActivations, layer_forward


def layer_scratch(N, C, dtype, device):
    """LayerActivations for N rows that every layer overwrites. residual3, a layer's output, is also the next layer's
    input (layer_forward allows it)."""
    act, f32 = dict(dtype=dtype, device=device), dict(dtype=torch.float32, device=device)
    return LayerActivations(
        ln1=torch.empty(N, C, **act), ln1_mean=torch.empty(N, **f32), ln1_rstd=torch.empty(N, **f32),
        qkv=torch.empty(N, 3 * C, **act), atty=torch.empty(N, C, **act), residual2=torch.empty(N, C, **act),
        ln2=torch.empty(N, C, **act), ln2_mean=torch.empty(N, **f32), ln2_rstd=torch.empty(N, **f32),
        fch=torch.empty(N, 4 * C, **act), fch_gelu=torch.empty(N, 4 * C, **act), residual3=torch.empty(N, C, **act))


def _check_tokens(tokens, vocab_size):
    if len(tokens) and not 0 <= min(tokens) <= max(tokens) < vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got [{min(tokens)}, {max(tokens)}]")


class KVCacheGPT2:
    """B rows of GPT-2 generation with a KV cache (the module's docstring). weights: flat fp32 parameters in llm.c's
    order (llmpy.formats.read_model), held in dtype (bf16 rounds them to nearest). max_len: the most positions a
    row will hold, prompt included (at most the model's max_seq_len). prefill and decode return the logits of the
    next token of every row, (B, V) float32 on the host."""

    def __init__(self, config, weights, rows, max_len, dtype=torch.bfloat16, device="cuda"):
        if not 0 < max_len <= config.max_seq_len:
            raise ValueError(f"a KV cache of {max_len} positions: the model holds 1 to {config.max_seq_len}")
        self.config, self.rows, self.max_len, self.dtype = config, rows, max_len, dtype
        self.device = torch.device(device)
        L, NH, C, Vp = config.num_layers, config.num_heads, config.channels, config.padded_vocab_size
        self.params = torch.empty(num_parameters(config), dtype=dtype, device=self.device)
        self.params.copy_(torch.from_numpy(np.asarray(weights, dtype=np.float32)))
        self.p = split_params(config, self.params)  # name -> view, e.g. self.p["qkvw"] is (L, 3C, C)
        self.k_cache = torch.empty(L, rows, NH, max_len, C // NH, dtype=dtype, device=self.device)
        self.v_cache = torch.empty_like(self.k_cache)
        # what a decode step reads: its inputs (written before each step, so a graph replays it), buffers, logits
        self.tokens = torch.zeros(rows, 1, dtype=torch.int32, device=self.device)
        self.length = torch.zeros(1, dtype=torch.int32, device=self.device)  # positions cached: the new tokens' one
        self.acts = layer_scratch(rows, C, dtype, self.device)
        self.lnf = torch.empty(rows, C, dtype=dtype, device=self.device)
        self.lnf_mean = torch.empty(rows, dtype=torch.float32, device=self.device)
        self.lnf_rstd = torch.empty(rows, dtype=torch.float32, device=self.device)
        self.logits = torch.empty(rows, Vp, dtype=dtype, device=self.device)
        self.position = 0  # the host's copy of the length
        self.cuda_graphs = self.device.type == "cuda"
        self._graph = None
        self._decoded = False  # a step has run eagerly: the kernels are compiled and cuBLASLt's plans chosen

    def prefill(self, prompt):
        """Reads the prompt (T0 >= 1 token ids) into every row's cache; the next token's logits, equal in every row."""
        T0, cfg, p = len(prompt), self.config, self.p
        if not 0 < T0 <= self.max_len:
            raise ValueError(f"a prompt of {T0} tokens: the cache holds 1 to {self.max_len}")
        _check_tokens(prompt, cfg.vocab_size)
        C, NH = cfg.channels, cfg.num_heads
        tokens = torch.tensor(prompt, dtype=torch.int32).view(1, T0).to(self.device)
        acts = layer_scratch(T0, C, self.dtype, self.device)
        lse = torch.empty(1, NH, T0, dtype=torch.float32, device=self.device)  # for a backward: unused here

        def attend(l, acts):
            qkv = acts.qkv.view(1, T0, 3 * C)
            attention.attention_forward(acts.atty.view(1, T0, C), lse, qkv, NH)
            _, k, v = vendor.heads(qkv, NH, 3)  # (1, NH, T0, HS) views of qkv, copied into every row
            self.k_cache[l, :, :, :T0].copy_(k)
            self.v_cache[l, :, :, :T0].copy_(v)

        encoder.encoder_forward(acts.residual3.view(1, T0, C), tokens, p["wte"], p["wpe"])
        for l in range(cfg.num_layers):
            layer_forward(p, l, acts.residual3, acts, attend, gelu_fusion=0)
        self._head(acts.residual3[T0 - 1:])
        self.position = T0
        return np.repeat(self._host_logits(1), self.rows, axis=0)

    def decode(self, tokens):
        """Appends one token to every row (tokens: B ids); the logits after it."""
        if self.position == 0 or self.position >= self.max_len:
            raise ValueError(f"decode at position {self.position}: needs a prefill first, and room in the cache of "
                             f"{self.max_len} positions")
        tokens = np.asarray(tokens, dtype=np.int32).reshape(self.rows, 1)
        _check_tokens(tokens.ravel().tolist(), self.config.vocab_size)
        self.tokens.copy_(torch.from_numpy(tokens))
        self.length.fill_(self.position)
        if not self.cuda_graphs or not self._decoded:
            self._decode_step()
            self._decoded = True
        else:
            if self._graph is None:
                self._graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self._graph):
                    self._decode_step()
            self._graph.replay()
        self.position += 1
        return self._host_logits(self.rows)

    def _decode_step(self):
        """The step of the tokens in self.tokens at position self.length: launches only."""
        a, p, C = self.acts, self.p, self.config.channels
        encoder.encoder_forward(a.residual3.view(self.rows, 1, C), self.tokens, p["wte"], p["wpe"],
                                first_position=self.length)
        for l in range(self.config.num_layers):
            layer_forward(p, l, a.residual3, a, self._decode_attend, gelu_fusion=0)
        self._head(a.residual3)

    def _decode_attend(self, l, acts):
        decode_attention(acts.atty, acts.qkv, self.k_cache[l], self.v_cache[l], self.length, self.config.num_heads)

    def _head(self, residual):
        """The final layernorm and the LM head (tied to wte) on the n <= B rows of residual (n, C): self.logits[:n]."""
        n, p = len(residual), self.p
        layernorm.layernorm_forward(self.lnf[:n], self.lnf_mean[:n], self.lnf_rstd[:n], residual, p["lnfw"], p["lnfb"])
        vendor.matmul_forward(self.logits[:n], self.lnf[:n], p["wte"])

    def _host_logits(self, n):
        return self.logits[:n, :self.config.vocab_size].float().cpu().numpy()




def full_forward_logits(config, weights, prompt, tokens, dtype=torch.bfloat16, device="cuda"):
    """What the KV cache is checked against. The training model's full forward (llmpy.models.gpt2.GPT2, with our attention
    and GELU kernels, as KVCacheGPT2 runs them) over the sequences that a generation of tokens (B, N) after prompt
    read, prompt + tokens[:, :-1], and the logits each new token was chosen from: (N, B, V) fp32 on the host, those
    at position len(prompt) - 1 + i for token i. A causal forward's logits at a position depend only on the tokens up
    to it, so they are what a generation without a cache would have chosen the same tokens from."""
    B, N = tokens.shape
    sequences = np.concatenate([np.tile(prompt, (B, 1)), tokens[:, :-1]], axis=1).astype(np.int32)
    T = sequences.shape[1]
    model = gpt2.build(config, B, T, dtype=dtype, device=device, attention_impl="triton", gelu_fusion=0)
    model.runtime.load_weights(weights)
    model.forward(torch.from_numpy(sequences), train=False)
    logits = model.acts.logits.view(B, T, -1)[:, len(prompt) - 1:, :config.vocab_size]
    return logits.float().cpu().numpy().transpose(1, 0, 2)
