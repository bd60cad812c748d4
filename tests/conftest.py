"""Fixtures every test file gets."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_threads():
    """train(threads=1) and the CLIs' --threads set the process-wide thread count; give the rest of the session
    its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
