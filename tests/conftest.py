"""Test set-up, hermetic: every test builds into one session-private kernel
cache and key (kernels still compile once per session), gets back the
environment it started with, and leaves no multi-rank process group behind."""
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():   # CPU machines run Triton kernels in its interpreter; GPUs run them for real
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SAMPLES = ["mlp", "transformer", "llama", "moe", "convnet", "llama_decode"]


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@pytest.fixture(scope="session")
def session_cache(tmp_path_factory):
    """One private cache directory and HMAC key file for the whole session (and one
    for Inductor's FX graph and kernel caches), holding a fixed CPU profile (the nominal one: no test asserts a timing,
    and measuring this machine costs ~20 s on a loaded 2-core box)."""
    import json
    from passlab.runtime.profiles import machine_key
    from passlab.runtime.simulator import NOMINAL_CPU
    root = tmp_path_factory.mktemp("passlab")
    cache, keys = root / "cache", root / "keys"
    cache.mkdir(mode=0o700)
    keys.mkdir(mode=0o700)
    profile = dict(NOMINAL_CPU, matmul_flops_per_s={"float32": 50e9, "bfloat16": 50e9},
                   source="fixed by tests/conftest.py", measured_at="never (tests)")
    (cache / f"profile-{machine_key('cpu')}.json").write_text(json.dumps(profile))
    inductor = root / "inductor"     # torch.compile's own cache: a shared /tmp one may hold another build's headers
    inductor.mkdir()
    return {"PASSLAB_CACHE": str(cache), "PASSLAB_KEY_FILE": str(keys / "cache.key"),
            "TORCHINDUCTOR_CACHE_DIR": str(inductor)}


@pytest.fixture(autouse=True)
def hermetic(session_cache):
    """Per test: the session cache, and afterwards the environment as it was
    (a test's or the code's own os.environ writes do not leak) and no process
    group of more than one rank (fake worlds of 64 and the like)."""
    saved = dict(os.environ)
    os.environ.update(session_cache)
    yield
    os.environ.clear()
    os.environ.update(saved)
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() != 1:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def tiny_samples():
    from passlab.graphs import load
    return {name: load(name, "tiny") for name in SAMPLES}
