import os
import shutil

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SAMPLES = ["mlp", "transformer", "llama", "moe", "convnet"]


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@pytest.fixture(scope="session")
def tiny_samples():
    from passlab.graphs import load
    return {name: load(name, "tiny") for name in SAMPLES}
