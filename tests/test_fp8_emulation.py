"""dev/fp8_emulation.py: its products are what it says they are, and it runs.

RoundedLinear's forward and gradients are compared with float64 products of the operands rounded by hand (exact in
float64, so up to fp32's accumulation, 1e-5 relative); with nothing rounded, with torch's own linear layer (1e-6).
"""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmpy.formats import write_shard

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dev"))

import fp8_emulation as emulation  # noqa: E402

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def operands(seed):
    g = torch.Generator().manual_seed(seed)
    inp = torch.randn(2, 5, 48, generator=g)
    weight = torch.randn(32, 48, generator=g) * 0.02
    bias = torch.randn(32, generator=g)
    dout = torch.randn(2, 5, 32, generator=g) * 1e-3
    return inp, weight, bias, dout


def run_linear(inp, weight, bias, dout, formats):
    inp, weight, bias = (t.clone().requires_grad_() for t in (inp, weight, bias))
    out = emulation.RoundedLinear.apply(inp, weight, bias, formats)
    out.backward(dout)
    return out.detach(), inp.grad, weight.grad, bias.grad


def test_nothing_rounded_is_torchs_linear():
    inp, weight, bias, dout = operands(0)
    ours = run_linear(inp, weight, bias, dout, emulation.operand_formats(None))
    inp, weight, bias = (t.clone().requires_grad_() for t in (inp, weight, bias))
    out = torch.nn.functional.linear(inp, weight, bias)
    out.backward(dout)
    for a, b in zip(ours, (out.detach(), inp.grad, weight.grad, bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("products", ["", "f", "d", "w", "fdw"])
def test_each_product_multiplies_its_operands_rounded(products):
    inp, weight, bias, dout = operands(1)
    out, dinp, dweight, dbias = run_linear(inp, weight, bias, dout, emulation.operand_formats(products))

    def q(x, fmt):  # the operand as the product sees it, in float64
        if fmt is torch.bfloat16:
            return x.to(fmt).double()
        scale = 2.0 ** torch.floor(torch.log2(torch.finfo(fmt).max / x.abs().max())).item()
        return (x * scale).to(fmt).double() / scale

    f4 = E4M3 if "f" in products else torch.bfloat16
    d5, d4 = (E5M2, E4M3) if "d" in products else (torch.bfloat16,) * 2
    w5, w4 = (E5M2, E4M3) if "w" in products else (torch.bfloat16,) * 2
    dout2, inp2 = dout.reshape(-1, 32), inp.reshape(-1, 48)
    expected = (q(inp, f4) @ q(weight, f4).t() + bias.double(), q(dout, d5) @ q(weight, d4),
                q(dout2, w5).t() @ q(inp2, w4), dout2.double().sum(0))
    for ours, want in zip((out, dinp, dweight, dbias), expected):
        torch.testing.assert_close(ours.double(), want, rtol=1e-5, atol=1e-9)
    # and FP8 really rounded: e4m3 keeps 3 mantissa bits, so the forward is off bf16's by far more than fp32's 1e-6
    if "f" in products:
        assert (out - run_linear(inp, weight, bias, dout, emulation.operand_formats(""))[0]).abs().max() > 1e-3


def test_a_bad_variant_is_one_line():
    with pytest.raises(ValueError, match="variant 'fdx/': not fp32, bf16, fp8 or BLOCKS/HEAD"):
        emulation.parse_variant("fdx/")
    assert emulation.parse_variant("fp8") == ("fdw", "fdw") and emulation.parse_variant("fd/") == ("fd", "")


def test_two_variants_train_and_compare(tmp_path):
    """Three steps of two variants from the same init on random tokens: the table, the logs, and a gap that is not
    zero (the head in bf16 against every product in bf16: only the blocks' rounding differs)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 2000), ("val", 200)):
        write_shard(tmp_path / f"{split}.bin", rng.integers(0, 50257, count))
    args = ["--variants", "bf16,fdw/", "-i", tmp_path / "train.bin", "-j", tmp_path / "val.bin", "--steps", 3,
            "-v", 3, "-b", 2, "-t", 16, "-c", 32, "-L", 1, "--val_tokens", 65, "--log_dir", tmp_path / "logs"]
    result = subprocess.run([sys.executable, str(ROOT / "dev" / "fp8_emulation.py"), *map(str, args)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "val loss (and minus bf16's)" in result.stdout
    logs = [(tmp_path / "logs" / name / "main.log").read_text() for name in ("bf16", "fdw_")]
    assert all(log.startswith("s:0 tel:") and "s:2 trl:" in log and "s:3 tel:" in log for log in logs), logs
    assert logs[0] != logs[1]
