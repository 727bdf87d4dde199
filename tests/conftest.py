import gc
import os
import warnings

import pytest
import torch
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)  # CI: the same examples every run
if os.environ.get("CI"):
    settings.load_profile("ci")

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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tests share two cores; oversubscribed OpenMP threads slow small-model training ~10x."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _release_zoo_memory(request):
    """Collect reference cycles after each zoo test: GraphModules of ViT-H/14-sized models left
    for the cyclic collector pushed one process past 24 GiB by the next model (OOM-killed)."""
    yield
    if request.node.get_closest_marker("zoo"):
        gc.collect()
