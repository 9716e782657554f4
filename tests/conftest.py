"""Suite-wide settings. OpenMP threads that spin while waiting waste a busy 2-core CI machine
(the service sets the same policy); this must happen before torch is imported."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of many tiny batches (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): on 2 shared
    cores one torch thread runs them faster than two handing work back and forth. Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
