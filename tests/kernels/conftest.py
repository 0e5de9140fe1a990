import pytest
import torch


@pytest.fixture
def device():
    """Kernel tests run on the GPU when there is one, else on CPU tensors under Triton's interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"
