"""How the training process's OpenMP threads wait: chosen by what shares its CPUs, the environment's own word first."""

from __future__ import annotations

import os

import pytest

from producer.local_backend import LocalBackend
from producer.settings import parse_settings
from trainer_worker.__main__ import set_openmp_wait
from trainer_worker.settings import TrainerSettings

REQUIRED = ["--redis-url", "redis://127.0.0.1:1/0", "--base-model", "m"]


@pytest.fixture(autouse=True)
def clean_openmp_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)


def test_a_trainer_alone_on_its_cpus_spins_briefly() -> None:
    settings = parse_settings(TrainerSettings, REQUIRED)
    set_openmp_wait(settings.openmp_wait)
    assert os.environ["GOMP_SPINCOUNT"] == "10000" and "OMP_WAIT_POLICY" not in os.environ


def test_a_trainer_sharing_its_cpus_sleeps_at_once() -> None:
    settings = parse_settings(TrainerSettings, [*REQUIRED, "--openmp-wait", "passive"])
    set_openmp_wait(settings.openmp_wait)
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in os.environ


@pytest.mark.parametrize("name", ["OMP_WAIT_POLICY", "GOMP_SPINCOUNT"])
def test_the_environments_own_wait_wins(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(name, "7")
    set_openmp_wait("spin")
    set_openmp_wait("passive")
    assert {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} == {
        "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None, name: "7"}


def test_an_unknown_wait_is_refused() -> None:
    with pytest.raises(SystemExit, match="openmp-wait"):
        parse_settings(TrainerSettings, [*REQUIRED, "--openmp-wait", "sometimes"])


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_local_stack_leaves_the_trainers_wait_to_its_default_unless_told(device: str) -> None:
    # vLLM computes on the CPU stack's CPUs only while it samples: spinning still won there (bench_local_loop).
    assert LocalBackend("/tmp/unused", device=device)._options.trainer_args == []
    told = LocalBackend("/tmp/unused", device=device, trainer_args=["--openmp-wait", "passive"])
    assert told._options.trainer_args == ["--openmp-wait", "passive"]
