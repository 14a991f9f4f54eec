"""Load and abuse of the web app's server (`clip-lens app`), on loopback, bounded in time and memory.

Starts the real command (``clip-lens app --port P``: the bundled toy-shapes model, the demo store of
300 scenes, its head labels and demo SAE) in a subprocess, waits for it, then, from this process:

1. **burst**: ``--concurrency`` (50) threads open a new connection at the same moment and send one
   request each, ``--rounds`` (4) times; the mix is :func:`clip_lens.app.loadtest.standard_calls`
   (page, static files, info, thumbnails, SAE list and status, three analyses, two refusals);
2. **soak**: ``--soak`` (200) requests of the same mix over 4 keep-alive connections; burst and soak
   are repeated ``--repeat`` (2) times, so that memory growth after the first pass shows a leak;
3. **malformed**: the red-team's requests (``HTTP/9.9``, garbage, HTTP/0.9, a 70 KB request line, a
   ``null`` body, a 5000-digit integer, 5000-deep nesting, a lone surrogate), each must get a 4xx JSON answer;
4. **pixel bombs**: the red-team's request (16 one-colour PNGs of 4096² as data URLs, 1.2 MB) sent
   ``--bombs`` (8) times at once;
   then 4 at once of the largest accepted request (2 PNGs of 4096², 32 Mi pixels);
5. **closed clients**: 40 connections closed (or reset) mid-request.

Prints resets, 5xx, p50/p99 latency and the server's RSS (``/proc/PID/status``: VmRSS now and VmHWM,
the peak) after each phase, and whether the server printed a traceback. Exit status 1 if any reset,
5xx, unanswered malformed request or traceback was seen.

    python benchmarks/bench_app_load.py                       # about 1-2 minutes on 2 CPU cores
    python benchmarks/bench_app_load.py --rounds 2 --soak 100 --json out.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from clip_lens.app.loadtest import burst, soak, standard_calls

HEAD = "L3H0"
MALFORMED = {
    "HTTP/9.9": b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
    "HTTP/0.9": b"GET /\r\n",
    "70 KB line": b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
}
BODIES = {
    "null body": b"null",
    "5000-digit int": b'{"text": "a", "head": "L3H0", "k": ' + b"9" * 5000 + b"}",
    "5000-deep nesting": b"[" * 5000 + b"]" * 5000,
    "lone surrogate": b'{"text": "\\ud800", "head": "L3H0"}',
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def memory(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of ``pid`` in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def post(path: str, body: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def exchange(port: int, data: bytes, timeout: float = 120) -> int:
    """Status of the answer to raw ``data``; 0 if the server closed without a JSON answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        try:
            connection.sendall(data)
        except OSError:
            pass
        chunks = []
        try:
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        except OSError:
            return 0
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    try:
        status = int(head.split()[1])
        json.loads(body)
    except (IndexError, ValueError):
        return 0
    return status


def png_url(side: int) -> str:
    """A one-colour RGB PNG: a small file that decodes to ``side²`` pixels."""
    image = Image.new("RGB", (side, side), (90, 30, 200))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--soak", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=2, help="burst + soak this many times (RSS growth after the "
                        "first shows whether memory keeps growing)")
    parser.add_argument("--bombs", type=int, default=8, help="simultaneous copies of the red-team's pixel-bomb request")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="clip_lens_app_", suffix=".log", delete=False)
    command = [sys.executable, "-m", "clip_lens.cli", "app", "--port", str(port)]
    if Path(sys.executable).with_name("clip-lens").exists():
        command = [str(Path(sys.executable).with_name("clip-lens")), "app", "--port", str(port)]
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    results: dict = {"cpus": os.cpu_count(), "load_average_before": os.getloadavg()}
    failed = False
    try:
        while True:  # the demo store, labels and SAE take a few seconds
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.perf_counter() - started > 300:
                    raise SystemExit(f"the server did not start; see {log.name}")
                time.sleep(0.5)
        print(f"server up in {time.perf_counter() - started:.1f} s (pid {process.pid}, port {port}); "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        address, calls = ("127.0.0.1", port), standard_calls(HEAD, sae="demo")
        soak(address, calls, n=len(calls), clients=1)  # warm-up: every endpoint once (first figures, SAE dashboard)
        results["rss_start"] = memory(process.pid)
        print(f"warm:      RSS {results['rss_start']['VmRSS']:.0f} MB, peak {results['rss_start']['VmHWM']:.0f} MB")

        phases = [(f"{name} {i + 1}", run) for i in range(args.repeat) for name, run in
                  (("burst", lambda: burst(address, calls, args.concurrency, args.rounds)),
                   ("soak", lambda: soak(address, calls, n=args.soak, clients=4)))]
        for name, report in phases:
            report = report()
            rss = memory(process.pid)
            failed |= bool(report.resets or report.server_errors or report.other_errors or report.unexpected)
            results[name] = {"requests": report.requests, "resets": report.resets, "5xx": report.server_errors,
                             "other_errors": dict(report.other_errors), "unexpected": dict(report.unexpected),
                             "p50_ms": report.percentile(50) * 1000, "p99_ms": report.percentile(99) * 1000,
                             "seconds": report.seconds, "rss": rss}
            print(f"{name + ':':10s} {report.summary()}; RSS {rss['VmRSS']:.0f} MB, peak {rss['VmHWM']:.0f} MB")

        statuses = {name: exchange(port, data) for name, data in MALFORMED.items()}
        statuses.update({name: exchange(port, post("/api/text_neighbors", body)) for name, body in BODIES.items()})
        results["malformed"] = statuses
        failed |= not all(400 <= status < 500 for status in statuses.values())
        print(f"malformed: {statuses}")

        bomb = json.dumps({"images": [png_url(4096)] * 16, "head": HEAD}).encode()
        largest = json.dumps({"images": [png_url(4096)] * 2, "head": HEAD, "k": 2}).encode()
        for name, body, n in (("16 × 4096² PNG (red team)", bomb, args.bombs), ("2 × 4096² PNG (largest accepted)", largest, 4)):
            before = memory(process.pid)
            with ThreadPoolExecutor(n) as pool:
                got = list(pool.map(lambda _: exchange(port, post("/api/image_neighbors", body)), range(n)))
            after = memory(process.pid)
            results[name] = {"body_kb": len(body) / 1024, "statuses": got, "rss_before": before, "rss_after": after}
            failed |= any(status == 0 or status >= 500 for status in got)
            print(f"{name}: {len(body) / 1024:.0f} KB × {n} at once → {got}; RSS {before['VmRSS']:.0f} → "
                  f"{after['VmRSS']:.0f} MB, peak {before['VmHWM']:.0f} → {after['VmHWM']:.0f} MB")

        analysis = post("/api/topic_segmentation", json.dumps({"images": [{"scene": 3}], "text": "a red shape"}).encode())
        for i in range(40):  # clients that go away mid-request, half of them with a reset
            connection = socket.create_connection(address)
            connection.sendall(analysis[: len(analysis) * (i % 4 + 1) // 4])
            if i % 2:
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            connection.close()
        time.sleep(2)
        results["after_closed_clients_status"] = exchange(port, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        results["rss_end"] = memory(process.pid)
        print(f"end:       RSS {results['rss_end']['VmRSS']:.0f} MB, peak {results['rss_end']['VmHWM']:.0f} MB "
              f"(growth over the run: {results['rss_end']['VmRSS'] - results['rss_start']['VmRSS']:+.0f} MB)")
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    text = Path(log.name).read_text(errors="replace")
    results["tracebacks"] = text.count("Traceback")
    results["load_average_after"] = os.getloadavg()
    failed |= bool(results["tracebacks"]) or results.get("after_closed_clients_status") != 200
    print(f"server log {log.name}: {results['tracebacks']} tracebacks; load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if not failed:
        os.unlink(log.name)
    print("FAILED (server log kept)" if failed else "OK")
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
