import os

import pytest

# Nothing may load from a model hub during tests.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tirforge.executors import ExecutorConfig, make_executor  # noqa: E402

# Both sandboxed backends run every executor test; neither may skip (CI installs bwrap and
# Docker and builds the sandbox image, see .ci/run).
BACKENDS = {
    "local": dict(backend="local", sandbox="bwrap"),
    "docker": dict(backend="docker"),
}


@pytest.fixture(params=list(BACKENDS))
def backend(request) -> str:
    return request.param


@pytest.fixture
def make_kernel(backend):
    """Factory: a started kernel of the current backend; all are closed after the test."""
    made = []

    def make(**overrides):
        cfg = ExecutorConfig(**{**BACKENDS[backend], "timeout": 10.0, **overrides})
        k = make_executor(cfg)
        made.append(k)
        k.start()
        return k

    yield make
    for k in made:
        k.close()
