import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from the Hub in tests

import pytest
import torch

from helpers import tiny_llama

# Tests that cannot run on this machine are left out of the run (deselected, counted and named in
# the summary), not collected and then skipped: a GPU machine runs the compiled Triton tests and
# leaves out the interpreter-only ones, a CPU machine the other way round.
HAS_CUDA = torch.cuda.is_available()
NOT_HERE = {"gpu": "no CUDA GPU on this machine (the compiled Triton path needs one; its logic runs under "
                   "TRITON_INTERPRET in the same files)"} if not HAS_CUDA else {
    "interpreter_only": "a CUDA GPU is present, so the Triton kernels are compiled, not interpreted"}
_left_out: dict[str, int] = {}


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        marker = next((m for m in NOT_HERE if item.get_closest_marker(m)), None)
        (drop if marker else keep).append(item)
        if marker:
            _left_out[marker] = _left_out.get(marker, 0) + 1
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_terminal_summary(terminalreporter):
    for marker, n in _left_out.items():
        terminalreporter.write_line(f"{n} tests marked {marker} deselected: {NOT_HERE[marker]}")


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()
