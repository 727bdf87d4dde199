import os
import warnings

import pytest
import torch

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the CUDA build of torch stays on the CPU
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def digits_cnn():
    from qcd_fx.examples import digits_cnn

    return digits_cnn().eval()
