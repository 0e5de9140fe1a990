"""Every version of every op in dev/kernels against its torch reference, at small sizes.

Each dev/kernels/<op>.py has a `check(small=True)` that runs each of its versions (its Triton kernels, the
mainline's, and torch's eager bound) on fresh seeded random inputs at tiny shapes (non-power-of-two widths, row
counts that are not a multiple of any block) and compares every output with a float64 torch reference, at the
tolerances stated and defended in that file; it raises AssertionError naming the version, the output and the error.
Here the kernels run under Triton's interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU);
on a GPU the same checks run on it. The op list is run.py's: every op module there must exist and pass.
"""

import importlib
import sys
from pathlib import Path

import pytest

DEV_KERNELS = Path(__file__).resolve().parents[1] / "dev" / "kernels"
sys.path.insert(0, str(DEV_KERNELS))

from run import OPS  # noqa: E402


def test_every_op_module_is_in_the_runner():
    """run.py (and so this test) covers every op file in dev/kernels."""
    modules = {path.stem for path in DEV_KERNELS.glob("*.py")} - {"common", "run"}
    assert modules == set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_every_version_matches_the_reference(op):
    module = importlib.import_module(op)
    lines = module.check(small=True)
    assert lines, f"{op}.check returned no results"
