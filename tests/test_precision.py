"""llmpy.precision, the linear layers' matmuls in bf16 or FP8, on the CPU (Triton's interpreter for the casts,
vendor.matmul_fp8's emulation for the products).

FP8's three products are compared with float64 products of the operands cast independently here, with torch's own
float8 conversion and the power-of-two scale the policy promises (the largest s with amax * s <= the format's
largest value, amax the tensor's own on its first cast, then the largest of its recent casts'): the only
differences are fp32 sums against float64 ones, so the tolerance is 1e-5 relative. A
weight the policy does not hold (the LM head) must run exactly as vendor's bf16 matmul. The whole model in FP8
against the PyTorch reference is tests/test_mainline_match.py's fp8 case.
"""

import math

import pytest
import torch

from llmpy import precision, vendor

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
MAX = {E4M3: 448.0, E5M2: 57344.0}
N, K, OC = 48, 64, 96


def fp8_values(x, fmt, amax=None):
    """x as the FP8 policy should see it: float64 values of fp8(x * s) / s, s = 2^floor(log2(max / amax)), amax x's
    own unless given; saturated at the format's largest value."""
    amax = x.abs().max().item() if amax is None else amax
    scale = 2.0 ** math.floor(math.log2(MAX[fmt] / amax))
    return (x.double() * scale).clamp(-MAX[fmt], MAX[fmt]).to(fmt).double() / scale


def rel_error(got, ref):
    return (torch.linalg.vector_norm(got.double() - ref) / torch.linalg.vector_norm(ref)).item()


@pytest.fixture
def layer():
    """One FP8 linear layer (weight (OC, K) and its gradient) and random inputs."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(OC, K, generator=g) * 0.02
    grad = torch.randn(OC, K, generator=g) * 1e-3
    matmuls = precision.matmuls("fp8", [[(weight, grad)]], N, torch.float32, "cpu")
    return matmuls, weight, grad, torch.randn(N, K, generator=g) * 3, torch.randn(N, OC, generator=g) * 1e-4


def test_forward_is_the_product_of_e4m3_operands(layer):
    matmuls, weight, _, inp, _ = layer
    bias, residual = torch.randn(OC) * 0.1, torch.randn(N, OC)
    out = torch.full((N, OC), float("nan"))
    matmuls.prepare()
    matmuls.forward(out, inp, weight, bias, residual)
    ref = fp8_values(inp, E4M3) @ fp8_values(weight, E4M3).t() + bias.double() + residual.double()
    assert rel_error(out, ref) <= 1e-5
    assert rel_error(out, inp.double() @ weight.double().t() + bias.double() + residual.double()) > 1e-3  # FP8


def test_input_gradient_is_e5m2_times_e4m3(layer):
    matmuls, weight, _, _, dout = layer
    dinp = torch.randn(N, K)
    ref = dinp.double() + fp8_values(dout, E5M2) @ fp8_values(weight, E4M3)
    matmuls.prepare()
    matmuls.backward_input(dinp, dout, weight, accumulate=True)
    assert rel_error(dinp, ref) <= 1e-5


@pytest.mark.parametrize("accumulate", [False, True])
def test_weight_gradient_is_e5m2_times_e4m3(layer, accumulate):
    """As in the model: the forward casts the input and the input gradient casts dout; the weight gradient turns
    those FP8 copies, at their scales. The bf16 tensors it is passed give the shapes only: other random values
    there must not change it."""
    matmuls, weight, grad, inp, dout = layer
    ref = (grad.double() if accumulate else 0) + fp8_values(dout, E5M2).t() @ fp8_values(inp, E4M3)
    matmuls.prepare()
    matmuls.forward(torch.empty(N, OC), inp, weight)
    matmuls.backward_input(torch.empty(N, K), dout, weight)
    matmuls.backward_weight(grad, torch.randn(N, OC), torch.randn(N, K), accumulate)
    assert rel_error(grad, ref) <= 1e-5


def test_a_bf16_forward_group_runs_only_its_gradients_in_fp8(layer):
    """bf16_forward (the LM head under lm_head="gradients": its logits are the loss's): the forward is vendor's
    product, bit for bit; the input and weight gradients are FP8's products, the weight gradient's e4m3 input the
    one that forward cast."""
    _, weight, grad, inp, dout = layer
    matmuls = precision.matmuls("fp8", [[(weight, grad)]], N, torch.float32, "cpu", bf16_forward=[0])
    out, expected = torch.full((N, OC), float("nan")), torch.full((N, OC), float("nan"))
    matmuls.prepare()
    matmuls.forward(out, inp, weight)
    vendor.matmul_forward(expected, inp, weight)
    assert torch.equal(out, expected)
    dinp = torch.full((N, K), float("nan"))
    matmuls.backward_input(dinp, dout, weight)
    assert rel_error(dinp, fp8_values(dout, E5M2) @ fp8_values(weight, E4M3)) <= 1e-5
    assert rel_error(dinp, dout.double() @ weight.double()) > 1e-3  # FP8 really ran
    matmuls.backward_weight(grad, dout, inp, accumulate=False)
    assert rel_error(grad, fp8_values(dout, E5M2).t() @ fp8_values(inp, E4M3)) <= 1e-5


def test_every_layer_keeps_its_own_input_for_its_weight_gradient():
    """Two layers of one group (two weights of one kind), in a model's order: both forwards, then each layer's
    input gradient and weight gradient, the top layer first. Each weight gradient is of its own layer's input and
    output gradient; a weight gradient before its input gradient is refused (it would read another's dout)."""
    g = torch.Generator().manual_seed(2)
    weights = [torch.randn(OC, K, generator=g) * 0.02 for _ in range(2)]
    grads = [torch.zeros(OC, K) for _ in range(2)]
    inps = [torch.randn(N, K, generator=g) * s for s in (3, 0.5)]
    douts = [torch.randn(N, OC, generator=g) * s for s in (1e-4, 2e-3)]
    matmuls = precision.matmuls("fp8", [list(zip(weights, grads))], N, torch.float32, "cpu")
    matmuls.prepare()
    for w, x in zip(weights, inps):
        matmuls.forward(torch.empty(N, OC), x, w)
    with pytest.raises(RuntimeError, match="follows its backward_input"):
        matmuls.backward_weight(grads[1], douts[1], inps[1], accumulate=False)
    for l in (1, 0):
        matmuls.backward_input(torch.empty(N, K), douts[l], weights[l])
        matmuls.backward_weight(grads[l], douts[l], inps[l], accumulate=False)
        assert rel_error(grads[l], fp8_values(douts[l], E5M2).t() @ fp8_values(inps[l], E4M3)) <= 1e-5


def test_scales_are_delayed_after_the_first_cast(layer):
    """Micro-batch 2's input is scaled by micro-batch 1's amax (the larger of the two's in its history after that):
    an input 3x larger saturates its largest values; micro-batch 3 then scales by 3x's amax."""
    matmuls, weight, _, inp, _ = layer
    out = torch.empty(N, OC)
    w64 = fp8_values(weight, E4M3)
    for x, amax in ((inp, None), (3 * inp, inp.abs().max().item()), (inp, 3 * inp.abs().max().item())):
        matmuls.prepare()
        matmuls.forward(out, x, weight)
        assert rel_error(out, fp8_values(x, E4M3, amax) @ w64.t()) <= 1e-5


def test_an_input_written_by_its_producer_is_taken_as_it_is(layer):
    """fp8_input hands a producer (a layernorm) the FP8 input buffer, scale and amax of a weight's next forward, once
    the input has a scale (before its first cast: None, the forward casts). Here fp8.cast plays the producer with
    another input, x2: the forward must multiply x2's FP8 values at the delayed scale (from the first input's amax),
    not the bf16 tensor it is passed; x2's amax must reach the next scale. A weight not in FP8, or one whose weight
    gradient reads the bf16 input (weight_grads_fp8=False), gets None."""
    from llmpy.kernels import fp8

    matmuls, weight, grad, inp, _ = layer
    out = torch.empty(N, OC)
    w64 = fp8_values(weight, E4M3)
    matmuls.prepare()
    assert matmuls.fp8_input(weight, N) is None
    matmuls.forward(out, inp, weight)
    matmuls.prepare()
    out8, scale, amax = matmuls.fp8_input(weight, N)
    x2 = torch.randn(N, K, generator=torch.Generator().manual_seed(9)) * 7
    fp8.cast(out8, x2, scale, amax_out=amax)
    matmuls.forward(out, torch.randn(N, K), weight)
    assert rel_error(out, fp8_values(x2, E4M3, inp.abs().max().item()) @ w64.t()) <= 1e-5
    matmuls.prepare()
    matmuls.forward(out, inp, weight)  # cast again: at the scale of the larger amax in its history, x2's
    assert rel_error(out, fp8_values(inp, E4M3, x2.abs().max().item()) @ w64.t()) <= 1e-5
    assert matmuls.fp8_input(torch.randn(OC, K), N) is None
    bf16_weight_grads = precision.matmuls("fp8", [[(weight, grad)]], N, torch.float32, "cpu", weight_grads_fp8=False)
    bf16_weight_grads.prepare()
    bf16_weight_grads.forward(out, inp, weight)
    assert bf16_weight_grads.fp8_input(weight, N) is None


def test_an_output_gradient_written_by_its_producer_is_taken_as_it_is(layer):
    """fp8_grad, fp8_input's twin for the backward: it hands a producer (GPT-2's GELU backward) the e5m2 buffer,
    scale and amax of a weight's next output gradient, once that gradient has a scale. fp8.cast plays the producer
    with another gradient, dout2: the input gradient and the weight gradient must both multiply dout2's e5m2 values
    at the delayed scale (from the first dout's amax), not the tensor they are passed, and dout2's amax must reach
    the next scale. A weight not in FP8, or one with a bf16 weight gradient (it reads the bf16 dout), gets None."""
    from llmpy.kernels import fp8

    matmuls, weight, grad, inp, dout = layer
    w64, inp64 = fp8_values(weight, E4M3), fp8_values(inp, E4M3)
    matmuls.prepare()
    assert matmuls.fp8_grad(weight, N) is None
    matmuls.forward(torch.empty(N, OC), inp, weight)
    matmuls.backward_input(torch.empty(N, K), dout, weight)
    matmuls.prepare()
    matmuls.forward(torch.empty(N, OC), inp, weight)
    out8, scale, amax = matmuls.fp8_grad(weight, N)
    dout2 = torch.randn(N, OC, generator=torch.Generator().manual_seed(8)) * 3e-4
    fp8.cast(out8, dout2, scale, amax_out=amax)
    dinp = torch.empty(N, K)
    matmuls.backward_input(dinp, torch.randn(N, OC), weight)
    matmuls.backward_weight(grad, torch.randn(N, OC), torch.randn(N, K), accumulate=False)
    dout2_64 = fp8_values(dout2, E5M2, dout.abs().max().item())
    assert rel_error(dinp, dout2_64 @ w64) <= 1e-5
    assert rel_error(grad, dout2_64.t() @ inp64) <= 1e-5
    matmuls.prepare()
    matmuls.backward_input(dinp, dout, weight)  # cast again: at the scale of the larger amax in its history, dout2's
    assert rel_error(dinp, fp8_values(dout, E5M2, dout2.abs().max().item()) @ w64) <= 1e-5
    assert matmuls.fp8_grad(torch.randn(OC, K), N) is None
    bf16_weight_grads = precision.matmuls("fp8", [[(weight, grad)]], N, torch.float32, "cpu", weight_grads_fp8=False)
    bf16_weight_grads.prepare()
    bf16_weight_grads.backward_input(dinp, dout, weight)
    assert bf16_weight_grads.fp8_grad(weight, N) is None
    assert precision.BF16.fp8_grad(weight, N) is None


def test_weight_gradient_in_bf16_when_asked():
    g = torch.Generator().manual_seed(1)
    weight, grad = torch.randn(OC, K, generator=g), torch.zeros(OC, K)
    inp, dout = torch.randn(N, K, generator=g), torch.randn(N, OC, generator=g)
    matmuls = precision.matmuls("fp8", [[(weight, grad)]], N, torch.float32, "cpu", weight_grads_fp8=False)
    matmuls.backward_weight(grad, dout, inp, accumulate=False)
    assert rel_error(grad, dout.double().t() @ inp.double()) <= 1e-6


def test_other_weights_run_as_before(layer):
    """The LM head (a weight the policy was not given) runs vendor's matmuls unchanged."""
    matmuls, _, _, inp, _ = layer
    head = torch.randn(OC, K)
    out, expected = torch.empty(N, OC), torch.empty(N, OC)
    matmuls.forward(out, inp, head)
    vendor.matmul_forward(expected, inp, head)
    assert torch.equal(out, expected)


def test_bf16_is_vendor_and_nonsense_is_refused():
    assert precision.matmuls("bf16", [], N, torch.bfloat16, "cpu").forward is vendor.matmul_forward
    with pytest.raises(ValueError, match="--precision must be one of bf16, fp8, not 'fp16'"):
        precision.matmuls("fp16", [], N, torch.bfloat16, "cpu")


@pytest.mark.parametrize("family, lm_head", [("gpt2", None), ("gpt2", False), ("gpt2", True),
                                             ("gpt2", "gradients"), ("llama3", None), ("llama3", True)])
def test_the_lm_head_is_fp8_as_asked_or_as_the_family_says(family, lm_head):
    """A tiny model in FP8: its logits are the LM head's product of lnf and wte in FP8 with lm_head=True, and the
    bf16 (here fp32) product with False, or with its gradients only in FP8 ("gradients"); with no option given
    (None), as its family's FP8_LM_HEAD says: GPT-2's head in FP8, Llama 3's in bf16."""
    from llmpy import models
    from llmpy.configs.gpt2 import GPT2Config
    from llmpy.configs.llama3 import Llama3Config

    config = (GPT2Config(max_seq_len=16, vocab_size=96, padded_vocab_size=128, num_layers=1, num_heads=2, channels=32)
              if family == "gpt2" else
              Llama3Config(max_seq_len=16, vocab_size=96, num_layers=1, num_heads=2, num_kv_heads=1, channels=32,
                           multiple_of=32))
    model = models.build(config, 2, 16, dtype=torch.float32, device="cpu", precision="fp8",
                         fp8_options={} if lm_head is None else {"lm_head": lm_head})
    model.init_weights(0)
    model.forward(torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0)))
    lnf, wte = model.acts.lnf, model.p[model.head_name(config)]
    fp8_head = lm_head is True or (lm_head is None and family == "gpt2")
    ref = fp8_values(lnf, E4M3) @ fp8_values(wte, E4M3).t() if fp8_head else lnf.double() @ wte.double().t()
    assert rel_error(model.acts.logits, ref) <= 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_under_fp8_the_bf16_linear_inputs_are_scratch(family):
    """FP8 keeps the e4m3 inputs its weight gradients read, so a model in FP8 holds one slot for all layers of its
    bf16 norm outputs and MLP activation output, and recomputes nothing even when asked (-r 2); in bf16, or with
    bf16 weight gradients (which read those tensors), one a layer, and recompute as asked."""
    from llmpy import models
    from llmpy.configs.gpt2 import GPT2Config
    from llmpy.configs.llama3 import Llama3Config

    config = (GPT2Config(max_seq_len=16, vocab_size=96, padded_vocab_size=128, num_layers=3, num_heads=2, channels=32)
              if family == "gpt2" else
              Llama3Config(max_seq_len=16, vocab_size=96, num_layers=3, num_heads=2, num_kv_heads=1, channels=32,
                           multiple_of=32))
    hidden = "fch_gelu" if family == "gpt2" else "fch_swiglu"
    for precision, options, recompute, slots in (("fp8", {}, 2, 1), ("fp8", {"weight_grads_fp8": False}, 1, 3),
                                                 ("bf16", {}, 0, 3)):
        model = models.build(config, 2, 16, dtype=torch.float32, device="cpu", precision=precision,
                             fp8_options=options, recompute=recompute)
        acts = model.acts
        expected = (1, 1, 1) if slots == 1 else (3, 3, 1 if recompute else 3)
        assert (len(acts.ln1), len(acts.ln2), len(getattr(acts, hidden))) == expected
        assert model.recompute == (0 if slots == 1 else recompute)


def test_the_lm_heads_fp8_gradients_are_the_products_of_their_fp8_operands(tmp_path):
    """dev/fp8_head_check.py on a tiny GPT-2 (GPT-2's vocabulary) under the interpreter, lm_head="gradients": after a
    calibrating micro-batch the classifier writes the e5m2 bytes a cast of torch's dlogits would (all but 1 in 10^5:
    the last bits of a softmax's exponentials may flip a rounding; 2 of 1.6 million differ here), the
    input and weight gradients are the float64 products of their FP8 operands (1e-5: fp32 sums), FP8's rounding moves
    them a few % from the bf16 operands' products (between 1e-3 and 0.1), and the rows of the tokens absent from the
    batch (all push-down) keep their size (the bug this guards against, a zero amax past 2^31 elements, zeroed them;
    that size is the GPU's: gpu_check.sh fp8_head)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from llmpy.formats import write_shard

    shard = tmp_path / "train.bin"
    write_shard(shard, np.random.default_rng(0).integers(0, 50257, 4096).astype(np.uint16))
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "dev/fp8_head_check.py", "--model", "tiny", "-b", "2", "-t", "16",
                           "--device", "cpu", "--input_bin", str(shard)], capture_output=True, text=True, cwd=root,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert float(re.search(r"bytes differing from torch's cast: \d+ of \d+ \((\S+)\)", out).group(1)) <= 1e-5, out
    for name in ("dlnf", "dwte"):
        fp8, bf16 = map(float, re.search(rf"{name}: against the float64 product of its FP8 operands (\S+), against "
                                         r"the bf16 operands' (\S+)", out).groups())
        assert fp8 <= 1e-5 and 1e-3 < bf16 < 0.1, out
    ratio = float(re.search(r"mean ratio of norms (\S+)", out).group(1))
    assert 0.9 < ratio < 1.1, out


@pytest.mark.parametrize("lm_head", [True, "gradients"])
@pytest.mark.parametrize("family", ["gpt2", "llama3"])
def test_the_fused_fp8_outputs_change_no_gradient(family, lm_head):
    """The kernels that write a linear layer's FP8 operand themselves (fp8_input: the norms, the final one for the LM
    head under lm_head=True, GPT-2's GELU; fp8_grad: the norms' backward, GPT-2's GELU backward, Llama's SwiGLU
    backward, the classifier) write the bytes and the amax a cast would: a tiny model trained 3 micro-batches (the
    fused paths run from the second) with them and with every one of them declined (fp8_input and fp8_grad returning
    None: the matmuls cast instead) must have the same losses and gradients, bit for bit (the interpreter adds in one
    order). Under lm_head="gradients" the final norm writes the bf16 input the head's forward reads."""
    from llmpy import models
    from llmpy.configs.gpt2 import GPT2Config
    from llmpy.configs.llama3 import Llama3Config

    config = (GPT2Config(max_seq_len=16, vocab_size=96, padded_vocab_size=128, num_layers=2, num_heads=2, channels=32)
              if family == "gpt2" else
              Llama3Config(max_seq_len=16, vocab_size=96, num_layers=2, num_heads=2, num_kv_heads=1, channels=32,
                           multiple_of=32))
    g = torch.Generator().manual_seed(5)
    batches = [(torch.randint(0, 96, (2, 16), generator=g), torch.randint(0, 96, (2, 16), generator=g))
               for _ in range(3)]
    results = []
    for fused in (True, False):
        model = models.build(config, 2, 16, dtype=torch.float32, device="cpu", precision="fp8",
                             fp8_options={"lm_head": lm_head})
        model.init_weights(0)
        if not fused:
            model.matmuls.fp8_input = model.matmuls.fp8_grad = lambda weight, rows: None
        loss_sum = torch.zeros(1)
        losses = []
        for i, (x, y) in enumerate(batches):
            loss_sum.zero_()
            model.train_micro_batch(x, y, 1.0 / 32, loss_sum, first=i == 0)
            losses.append(loss_sum.item())
        results.append((losses, model.runtime.grads.clone()))
    (fused_losses, fused_grads), (cast_losses, cast_grads) = results
    assert fused_losses == cast_losses
    assert torch.equal(fused_grads, cast_grads)
    assert fused_grads.abs().sum() > 0
