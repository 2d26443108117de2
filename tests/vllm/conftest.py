"""Fixtures for the real-vLLM tests: a real agent process, vLLM runner processes,
the tiny model. Everything runs on the CPU; nothing is downloaded."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from vllm_harness import Agent, Runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _have_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    if _have_vllm():
        return
    skip = pytest.mark.skip(reason="vLLM is not installed")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_gemma3_model() -> str:
    from tests.conftest import build_test_model

    return build_test_model("tiny-gemma3", "tiny-gemma3")


@pytest.fixture(scope="module")
def spawn_runner(tmp_path_factory: pytest.TempPathFactory, tiny_model: str) -> Iterator[Any]:
    runners: list[Runner] = []
    logs = tmp_path_factory.mktemp("vllm-logs")

    def spawn(
        extra: dict[str, Any] | None,
        name: str,
        env: dict[str, str] | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        cpus: set[int] | None = None,
    ) -> Runner:
        r = Runner(tiny_model, extra, logs / f"{name}.log", env, llm_kwargs, cpus)
        runners.append(r)
        return r

    yield spawn
    for r in runners:
        r.close()


@pytest.fixture(scope="module")
def make_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    agents: list[Agent] = []

    def make(runtime_dir: Path | None = None, env: dict[str, str] | None = None) -> Agent:
        rd = runtime_dir or tmp_path_factory.mktemp("kvnode-run")
        a = Agent(rd, rd.parent / f"{rd.name}-agent.log", env).start()
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.stop()
