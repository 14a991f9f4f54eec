"""A small load generator for the app's server (loopback, bounded): bursts of simultaneous connections
and a keep-alive soak, counting resets, status codes and latencies.

Used by ``benchmarks/bench_app_load.py`` and ``tests/reliability/test_app_server.py``; standard library only.

>>> report = burst(("127.0.0.1", 8765), requests, concurrency=50, rounds=4)   # doctest: +SKIP
>>> report.resets, report.server_errors, report.percentile(99)                 # doctest: +SKIP
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional, Sequence

RESETS = (ConnectionResetError, ConnectionRefusedError, ConnectionAbortedError, BrokenPipeError,
          http.client.RemoteDisconnected)
"""What a client sees when the server drops its connection (e.g. a full listen backlog)."""


@dataclass(frozen=True)
class Call:
    """One request: ``method``, ``path``, a JSON ``body`` (or raw ``data``), and the statuses it may get."""

    method: str
    path: str
    body: object = None
    data: Optional[bytes] = None
    expect: tuple[int, ...] = (200,)

    def payload(self) -> Optional[bytes]:
        if self.data is not None:
            return self.data
        return None if self.body is None else json.dumps(self.body).encode()


@dataclass
class LoadReport:
    """Outcome of a load run."""

    requests: int = 0
    statuses: Counter = field(default_factory=Counter)
    resets: int = 0
    other_errors: Counter = field(default_factory=Counter)
    unexpected: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def server_errors(self) -> int:
        """Answers with a 5xx status."""
        return sum(n for status, n in self.statuses.items() if status >= 500)

    def percentile(self, q: float) -> float:
        """Latency percentile ``q`` (0..100) in seconds, over answered requests."""
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]

    def add(self, other: "LoadReport") -> None:
        self.requests += other.requests
        self.statuses.update(other.statuses)
        self.resets += other.resets
        self.other_errors.update(other.other_errors)
        self.unexpected.update(other.unexpected)
        self.latencies += other.latencies
        self.seconds += other.seconds

    def summary(self) -> str:
        return (f"{self.requests} requests in {self.seconds:.1f} s: resets {self.resets}, 5xx {self.server_errors}, "
                f"other errors {dict(self.other_errors) or 0}, unexpected statuses {dict(self.unexpected) or 0}, "
                f"p50 {self.percentile(50) * 1000:.0f} ms, p99 {self.percentile(99) * 1000:.0f} ms, "
                f"statuses {dict(sorted(self.statuses.items()))}")


def standard_calls(head: str = "L3H0", sae: Optional[str] = None) -> list[Call]:
    """A mix of what the page sends: the page and its files, info, thumbnails, three analyses on store rows,
    rendered scenes and a text, the SAE list (with ``sae``), and two refusals (a ``null`` body, an unknown head)."""
    calls = [
        Call("GET", "/"), Call("GET", "/static/app.js"), Call("GET", "/api/info"), Call("GET", "/api/sae_status"),
        Call("GET", "/api/thumbnails?start=0&count=4"),
        Call("POST", "/api/text_neighbors", {"text": "a red shape", "head": head, "k": 3}),
        Call("POST", "/api/topic_segmentation", {"images": [{"scene": 2}], "text": "a blue shape", "head": head}),
        Call("POST", "/api/image_neighbors", {"images": [{"store_row": 1}], "head": head, "k": 2}),
        Call("POST", "/api/text_neighbors", data=b"null", expect=(400,)),
        Call("POST", "/api/text_neighbors", {"text": "a", "head": "L99H0"}, expect=(400,)),
    ]
    if sae is not None:
        calls.append(Call("POST", "/api/sae_features", {"sae": sae, "count": 10}))
    return calls


def _one(connection: http.client.HTTPConnection, call: Call, report: LoadReport, lock: threading.Lock) -> bool:
    """Send ``call`` on ``connection``; record it; False if the connection is unusable afterwards."""
    headers = {"Host": "127.0.0.1"}
    payload = call.payload()
    if payload is not None:
        headers["Content-Type"] = "application/json"
    start = time.perf_counter()
    try:
        connection.request(call.method, call.path, payload, headers)
        response = connection.getresponse()
        response.read()
        status, keep = response.status, not response.will_close
    except RESETS:
        with lock:
            report.requests += 1
            report.resets += 1
        return False
    except (OSError, http.client.HTTPException) as exc:
        with lock:
            report.requests += 1
            report.other_errors[type(exc).__name__] += 1
        return False
    elapsed = time.perf_counter() - start
    with lock:
        report.requests += 1
        report.statuses[status] += 1
        report.latencies.append(elapsed)
        if status not in call.expect:
            report.unexpected[f"{call.method} {call.path} → {status}"] += 1
    return keep


def burst(address: tuple[str, int], calls: Sequence[Call], concurrency: int = 50, rounds: int = 4,
          timeout: float = 120.0) -> LoadReport:
    """``rounds`` times: ``concurrency`` threads each open a new connection at the same moment (a barrier)
    and send one call (``calls`` in turn), as the red-team pass did against the old server."""
    report, lock = LoadReport(), threading.Lock()
    start = time.perf_counter()
    for round_ in range(rounds):
        barrier = threading.Barrier(concurrency)

        def worker(i: int) -> None:
            call = calls[(round_ * concurrency + i) % len(calls)]
            connection = http.client.HTTPConnection(*address, timeout=timeout)
            try:
                barrier.wait(timeout)
                _one(connection, call, report, lock)
            finally:
                connection.close()

        with ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(worker, range(concurrency)))
    report.seconds = time.perf_counter() - start
    return report


def soak(address: tuple[str, int], calls: Sequence[Call], n: int = 200, clients: int = 4,
         timeout: float = 120.0) -> LoadReport:
    """``n`` calls over ``clients`` keep-alive connections (reopened when the server closes one)."""
    report, lock = LoadReport(), threading.Lock()
    counter = iter(range(n))
    start = time.perf_counter()

    def client(_: int) -> None:
        connection = http.client.HTTPConnection(*address, timeout=timeout)
        try:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if not _one(connection, calls[i % len(calls)], report, lock):
                    connection.close()
                    connection = http.client.HTTPConnection(*address, timeout=timeout)
        finally:
            connection.close()

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    report.seconds = time.perf_counter() - start
    return report
