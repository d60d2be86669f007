"""A job whose training group fails under it runs again on the restarted group, a bounded number of times."""

from __future__ import annotations

import pytest

from producer.errors import TrainerGroupError
from producer.types import JobOutcome, ModelRef, TrainRequest
from trainer_worker.jobs import Claim, JobRunner

REQUEST = TrainRequest(job_id="j1", kind="train", model=ModelRef(project="p", name="n", base_model="m"))
CLAIM = Claim("run", token="1", attempt="1", step=0)


def runner_failing(times: int, monkeypatch: pytest.MonkeyPatch) -> tuple[JobRunner, list[int]]:
    """A runner whose group fails ``times`` times before a run succeeds; and the list of its runs."""
    runner = JobRunner(None, None, base_model="m", worker_name="w")  # type: ignore[arg-type]
    runs: list[int] = []

    def execute(request: TrainRequest, claim: Claim) -> JobOutcome:
        runs.append(1)
        if len(runs) <= times:
            raise TrainerGroupError("a rank died")
        return JobOutcome(step=1)

    monkeypatch.setattr(runner, "_execute", execute)
    return runner, runs


def test_a_job_runs_again_when_its_group_fails_under_it(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, runs = runner_failing(2, monkeypatch)
    assert runner._execute_on_group(REQUEST, CLAIM).step == 1
    assert len(runs) == 3


def test_a_job_whose_group_fails_three_times_fails_with_the_groups_error(monkeypatch: pytest.MonkeyPatch) -> None:
    runner, runs = runner_failing(3, monkeypatch)
    with pytest.raises(TrainerGroupError, match="a rank died"):
        runner._execute_on_group(REQUEST, CLAIM)
    assert len(runs) == 3
