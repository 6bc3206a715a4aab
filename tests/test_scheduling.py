"""How the simulation sizes its ClientApp workers, and how often the coordinator polls for replies."""

from __future__ import annotations

import pytest

from tace.server import federation
from tace.simulation.runner import simulation_cpus


@pytest.mark.parametrize(
    ("n_train", "threads", "cores", "expected"),
    [
        (3, 1, 2, (3, 1)),  # the demo: every training site its own worker, so no site waits a whole site-time
        (4, 1, 2, (4, 1)),
        (5, 1, 2, (2, 1)),  # more than twice the cores: one worker per core, the waves of sites are nearly even
        (98, 1, 2, (2, 1)),  # bench_sites --n-sites 100: memory stays that of two workers
        (2, 1, 2, (2, 1)),
        (1, 1, 16, (16, 1)),
        (2, 2, 4, (4, 2)),  # two threads per site: a worker of two CPUs each
        (3, 2, 4, (6, 2)),  # three sites on two such workers' cores: three workers
        (3, 2, 2, (2, 2)),  # the sites' threads already fill the cores: one worker, the sites in turn
        (1, 4, 2, (4, 4)),  # more threads than cores: one worker, Ray told of the CPUs it asks for
        (8, 1, 16, (16, 1)),
    ],
)
def test_simulation_gives_each_training_site_a_worker_when_there_are_a_few_more_than_cores(n_train, threads, cores, expected):
    ray_cpus, per_worker = simulation_cpus(n_train, threads, cores)
    assert (ray_cpus, per_worker) == expected
    assert ray_cpus // per_worker >= min(n_train, max(1, cores // max(1, threads)))


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s


def test_polls_wait_an_eighth_of_the_time_waited_within_bounds(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(federation, "time", clock)
    polls = federation._polls(deadline=30.0)
    seen = []
    for _ in polls:
        seen.append(clock.now)
    waits = clock.sleeps
    assert waits[0] == pytest.approx(federation.POLL_MIN_S)
    assert max(waits) == pytest.approx(federation.POLL_S)
    assert seen[-1] == pytest.approx(30.0)  # the last poll is at the deadline, not past it
    # A reply that arrives at time t is seen at most max(POLL_MIN_S, t/8) later, capped at POLL_S.
    for before, after in zip(seen, seen[1:], strict=False):
        assert after - before <= max(federation.POLL_MIN_S, before * federation.POLL_FRACTION) + 1e-9
        assert after - before <= federation.POLL_S + 1e-9
    # Cheap on the SuperLink: a 30 s wait costs fewer than one poll per 0.3 s on average.
    assert len(seen) < 100
