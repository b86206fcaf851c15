"""bench.common.run_queue: every job runs once on some worker; jobs taken after the deadline are skipped."""

import threading

from bench import common


def test_every_job_runs_once_spread_over_the_workers():
    seen, lock = [], threading.Lock()

    def work(job, worker):
        with lock:
            seen.append((job, worker))
        return {"name": job}

    outcomes = common.run_queue(list(range(20)), ["a", "b"], work)
    assert sorted(o["name"] for o in outcomes) == list(range(20))
    assert sorted(job for job, _ in seen) == list(range(20))
    assert {worker for _, worker in seen} <= {"a", "b"}


def test_jobs_taken_once_too_late_are_skipped_not_run():
    ran = []
    outcomes = common.run_queue(["x", "y", "z"], [0], lambda job, w: ran.append(job) or {"name": job},
                                too_late=lambda: len(ran) >= 1, skipped=lambda job: {"name": job, "skipped": True})
    assert ran == ["x"]
    assert outcomes == [{"name": "x"}, {"name": "y", "skipped": True}, {"name": "z", "skipped": True}]
