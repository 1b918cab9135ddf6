import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from the Hub in tests

import pytest
from helpers import tiny_llama
from machine_marks import deselect_unrunnable, report_left_out


def pytest_collection_modifyitems(config, items):
    deselect_unrunnable(config, items)  # GPU-only tests on a CPU machine, and vice versa


def pytest_terminal_summary(terminalreporter):
    report_left_out(terminalreporter)


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()
