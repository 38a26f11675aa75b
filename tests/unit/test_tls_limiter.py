"""tls_rate_limit_per_second's limiter, on a clock the test sets."""

from __future__ import annotations

from pg_doorman.net.tls import HandshakeLimiter


def test_a_burst_of_rate_over_100_then_one_per_interval() -> None:
    limiter = HandshakeLimiter(200)  # a burst of 2, then one each 5 ms
    now = 1000.0
    delays = [limiter.delay(now) for _ in range(6)]
    assert delays[:2] == [0.0, 0.0]
    assert [round(d, 6) for d in delays[2:]] == [0.005, 0.010, 0.015, 0.020]


def test_idle_time_refills_only_up_to_the_burst() -> None:
    limiter = HandshakeLimiter(300)  # a burst of 3
    assert limiter.delay(0.0) == 0.0
    # A long quiet spell does not bank more than one burst.
    later = 60.0
    delays = [limiter.delay(later) for _ in range(5)]
    assert delays[:3] == [0.0, 0.0, 0.0]
    assert [round(d, 6) for d in delays[3:]] == [0.003333, 0.006667]


def test_spaced_requests_never_wait() -> None:
    limiter = HandshakeLimiter(1000)
    assert all(limiter.delay(i * 0.001) == 0.0 for i in range(1000))


def test_average_rate_over_many_requests() -> None:
    limiter = HandshakeLimiter(300)
    delays = [limiter.delay(5.0) for _ in range(301)]
    # 300 handshakes asked for at once: the last starts about a second later.
    assert 0.98 < delays[-1] < 1.0
