import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing loads from the Hub in tests

import pytest

from helpers import tiny_llama


@pytest.fixture(scope="session")
def llama():
    return tiny_llama()
