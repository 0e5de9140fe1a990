"""Rounding fp32 results to the activation dtype, to nearest even, on the GPU and under Triton's interpreter alike.

On the GPU `x.to(tl.bfloat16)` rounds to nearest, ties to even (one cvt.rn instruction). Triton's interpreter
(3.9) truncates instead (rounds toward zero), with or without fp_downcast_rounding="rtne": its results would be up to
one bf16 ulp off the GPU's and biased toward zero. `round_to` does the rounding by hand on the fp32 bits when
interpreting, so CPU tests check the same numbers the GPU computes: adding 0x7FFF plus the lowest kept bit and
dropping the low 16 bits is round-to-nearest-even; infinities stay infinite and NaNs stay NaN (a quiet NaN's high
bits are unchanged by the carry). On the GPU the branch is compiled out.
"""

import triton
import triton.language as tl

from . import INTERPRET

_ROUND_IN_SOFTWARE = tl.constexpr(INTERPRET)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """x (fp32) rounded to dtype (bf16: to nearest even; fp32: unchanged)."""
    if _ROUND_IN_SOFTWARE and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        rounded = x.to(dtype)
    return rounded
