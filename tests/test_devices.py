"""Reports, as one skip, that the CUDA half of the device-parametrized tests did not run."""

import pytest
import torch

from conftest import DEVICES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: tests ran on CPU only")
def test_cuda_is_in_the_device_fixture():
    assert "cuda" in DEVICES
    assert torch.zeros(1, device="cuda").device.type == "cuda"
