"""The web app's server under hostile and heavy traffic: every malformed request gets a 4xx JSON
answer (never a 500, never silence), slow requests get 408, budgets hold (bytes, images, pixels),
closed clients leave no traceback, and bursts of simultaneous connections are neither reset nor 5xx.

The red-team pass against the old standard-library server found each of these cases broken."""

import asyncio
import base64
import io
import json
import logging
import re
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from clip_lens import HookedCLIP
from clip_lens.app import demo_workspace, make_server
from clip_lens.app.guard import MAX_JSON_DEPTH, ByteBudget
from clip_lens.app.loadtest import burst, soak, standard_calls
from tests.helpers import serving

MAX_UPLOAD = 256 * 1024
TIMEOUT = 1.5  # the server's request deadline, short so that the slow-client tests stay quick
HEAD = "L3H0"


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def server(toy, tmp_path_factory):
    workspace = demo_workspace(toy, tmp_path_factory.mktemp("app"), n_scenes=40)
    server = make_server(toy, workspace.store, workspace.labels, thumbnails=workspace.thumbnails,
                         max_upload_bytes=MAX_UPLOAD, request_timeout=TIMEOUT)
    with serving(server):
        yield server


@pytest.fixture
def no_tracebacks(caplog, capfd):
    """Fails the test if anything in the process logged an exception or printed a traceback."""
    with caplog.at_level(logging.DEBUG):
        yield
        time.sleep(0.1)  # let the server finish with the connections
    tracebacks = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
    assert "Traceback" not in capfd.readouterr().err


# --- raw HTTP -------------------------------------------------------------------------------
def read_reply(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def parse(reply: bytes) -> tuple[int, dict, dict]:
    """``(status, headers, JSON body)`` of one answer; the body must be the error JSON shape when >= 400."""
    head, _, body = reply.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    answer = json.loads(body)
    if status >= 400:
        assert answer["status"] == status and isinstance(answer["error"], str) and answer["error"]
        assert headers["content-type"].startswith("application/json")
        assert headers["x-content-type-options"] == "nosniff" and "default-src 'self'" in headers["content-security-policy"]
    return status, headers, answer


def exchange(server, data: bytes, timeout: float = 20) -> tuple[int, dict, dict]:
    """Send raw bytes, read until the server closes, parse the answer."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as connection:
        connection.sendall(data)
        return parse(read_reply(connection))


def post(path: str, body: bytes, headers: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n{headers}\r\n").encode() + body


def png_url(width: int, height: int, mode: str = "1") -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")  # mode "1": a tiny file, many pixels
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# --- malformed requests: 4xx JSON, never silence -------------------------------------------
class TestMalformedRequests:
    @pytest.mark.parametrize("data, status, message", [
        (b"GET / HTTP/9.9\r\nHost: 127.0.0.1\r\n\r\n", 400, "HTTP/9.9 is not supported"),
        (b"GET / HTTP/2.0\r\nHost: 127.0.0.1\r\n\r\n", 400, "HTTP/2.0 is not supported"),
        (b"GET /\r\n", 400, "is not 'METHOD /path HTTP/1.1'"),  # HTTP/0.9
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "malformed HTTP request"),  # a TLS hello
        (b"garbage\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nbad header line\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "Host"),  # HTTP/1.1 requires Host
        (b"GET /api/info HTTP/1.1\r\nHost: [::1\r\n\r\n", 403, "refused"),
        (b"GET /api/info HTTP/1.0\r\n\r\n", 403, "refused"),  # no Host: not a loopback name
        (b"POST /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n", 400, "malformed"),
        (b"POST /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1e3\r\n\r\n", 400, "malformed"),
        (b"PUT /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n", 405, "PUT is not allowed"),
        (b"OPTIONS /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "OPTIONS is not allowed"),
        (b"GET /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n", 405, "POST to /api/text_neighbors"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "the limit is 8,192"),
    ])
    def test_bad_request_lines_and_headers_get_json_errors(self, server, no_tracebacks, data, status, message):
        got, _, answer = exchange(server, data)
        assert got == status and message in answer["error"], answer

    def test_a_70_kb_request_line_gets_an_answer(self, server, no_tracebacks):
        got, _, answer = exchange(server, b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert got in (414, 431) and answer["status"] == got  # 431 when h11 sees 16 KiB without the line's end

    def test_headers_over_16_kib_get_431(self, server, no_tracebacks):
        headers = "".join(f"X-Filler-{i}: {'x' * 100}\r\n" for i in range(200))
        with socket.create_connection(server.server_address[:2], timeout=20) as connection:
            connection.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode())
            time.sleep(0.1)  # the line arrives first, then the headers grow past the limit unfinished
            for start in range(0, len(headers), 4096):
                connection.sendall(headers[start:start + 4096].encode())
            status, _, answer = parse(read_reply(connection))
        assert status == 431 and "malformed HTTP request" in answer["error"]

    @pytest.mark.parametrize("body, message", [
        (b"null", "must be a JSON object"),
        (b"[1, 2]", "must be a JSON object"),
        (b'"text"', "must be a JSON object"),
        (b"", "not valid JSON"),
        (b"{not json", "not valid JSON"),
        (b'{"text": "a red shape", "head": "L3H0", "k": 3', "not valid JSON"),
        (b'{"text": "a", "head": "L3H0", "k": ' + b"9" * 5000 + b"}", "5,000 digits"),
        (b'{"text": "a", "head": "L3H0", "k": -' + b"9" * 5000 + b"}", "5,000 digits"),
        (b'{"text": "a", "head": "L3H0", "k": NaN}', "NaN is not JSON"),
        (b'{"text": "a", "head": "L3H0", "k": -Infinity}', "-Infinity is not JSON"),
        (b'{"text": "a", "head": "L3H0", "k": 1e999}', "k must be a whole number"),
        (b"[" * 5000 + b"]" * 5000, "nests deeper"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "nests deeper"),
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), f"deeper than {MAX_JSON_DEPTH}"),
        (b"[" * 5000, "not valid JSON"),  # unclosed, deep
        (b'{"text": "\\ud800", "head": "L3H0"}', "lone surrogate"),
        (b'{"\\udfff": 1}', "lone surrogate"),
        (b'{"text": "a\\ud83d", "head": "L3H0"}', "lone surrogate"),
        (b'{"text": "\xff\xfe", "head": "L3H0"}', "not UTF-8"),
        (b'{"text": "\xed\xa0\x80", "head": "L3H0"}', "not UTF-8"),  # a surrogate encoded in UTF-8 bytes
        (b'{"text": "a", "head": "L3H0", "k": 3, "extra": {}}', "unknown field 'extra'"),
    ])
    def test_bad_json_bodies_get_400_with_the_reason(self, server, no_tracebacks, body, message):
        status, _, answer = exchange(server, post("/api/text_neighbors", body))
        assert status == 400 and message in answer["error"], answer

    def test_a_valid_surrogate_pair_is_a_character(self, server):
        status, _, answer = exchange(server, post("/api/text_neighbors", b'{"text": "a red shape \\ud83d\\ude00", '
                                                  b'"head": "L3H0", "k": 2}'))
        assert status == 200 and len(answer["neighbours"][0]) == 2

    @pytest.mark.parametrize("endpoint", ["property_neighbors", "topic_segmentation", "contrastive_segmentation",
                                          "image_neighbors", "text_neighbors", "sae_features", "sae_feature", "sae_image"])
    def test_hostile_field_values_never_get_a_500(self, server, endpoint):
        """Every field of every endpoint, set to values of the wrong type, size or range: 200 or 400, never 5xx."""
        fields = {"property_neighbors": ("images", "property", "k", "metric", "texts"),
                  "topic_segmentation": ("images", "text", "head"),
                  "contrastive_segmentation": ("images", "text_a", "text_b", "head"),
                  "image_neighbors": ("images", "head", "k"), "text_neighbors": ("text", "head", "k"),
                  "sae_features": ("sae", "order", "text", "start", "count"), "sae_feature": ("sae", "feature", "k"),
                  "sae_image": ("sae", "images", "k")}[endpoint]
        valid = {"images": [{"scene": 1}], "property": "colour", "k": 2, "metric": "dot", "texts": ["a red shape"],
                 "text": "a red shape", "text_a": "a red shape", "text_b": "a blue shape", "head": HEAD, "sae": "demo",
                 "order": "frequency", "start": 0, "count": 2, "feature": 0}
        hostile = [None, True, -1, 2**63, 1.5, "", " ", "x" * 5000, "\x00", "L3H0\n", [], {}, [None], [[[]]],
                   [{"scene": -1}], [{"scene": 2**40}], [{"store_row": 10**9}], [{"scene": 1, "seed": "a"}],
                   ["data:image/png;base64,"], ["data:image/png;base64,AAAA"], ["data:image/svg+xml;base64,PHN2Zz4="]]
        for field in fields:
            for value in hostile:
                body = {**{key: valid[key] for key in fields}, field: value}
                status, _, answer = exchange(server, post(f"/api/{endpoint}", json.dumps(body).encode()))
                assert status in (200, 400), (field, value, status, answer)


# --- budgets ---------------------------------------------------------------------------------
class TestBudgets:
    def test_oversize_content_length_gets_413_before_the_body(self, server, no_tracebacks):
        with socket.create_connection(server.server_address[:2], timeout=10) as connection:
            connection.sendall(b"POST /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n")
            status, _, answer = parse(read_reply(connection))  # no "100 Continue": the body is never asked for
        assert status == 413 and "over the limit" in answer["error"]

    def test_oversize_body_sent_anyway_gets_the_413_not_a_reset(self, server, no_tracebacks):
        body = json.dumps({"text": "x" * (4 * MAX_UPLOAD)}).encode()
        status, _, answer = exchange(server, post("/api/text_neighbors", body))
        assert status == 413 and f"{MAX_UPLOAD:,} bytes" in answer["error"]

    def test_chunked_body_is_cut_off_at_the_limit(self, server, no_tracebacks):
        chunk = b"x" * 65536
        with socket.create_connection(server.server_address[:2], timeout=20) as connection:
            connection.sendall(b"POST /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               b"Transfer-Encoding: chunked\r\n\r\n")
            try:
                for _ in range(2 * MAX_UPLOAD // len(chunk)):
                    connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:
                pass  # the server may have stopped reading: the answer is already there
            status, _, answer = parse(read_reply(connection))
        assert status == 413 and "over the limit" in answer["error"]

    def test_small_chunked_body_is_read(self, server):
        body = json.dumps({"text": "a red shape", "head": HEAD, "k": 2}).encode()
        data = (b"POST /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n" + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
        status, _, answer = exchange(server, data)
        assert status == 200 and len(answer["neighbours"][0]) == 2

    def test_pixels_are_budgeted_over_the_whole_request(self, server, no_tracebacks):
        """The red-team request: 16 PNGs of 4096², each under the per-image limit, together 268 megapixels."""
        url = png_url(4096, 4096)
        status, _, answer = exchange(server, post("/api/image_neighbors", json.dumps(
            {"images": [url] * 16, "head": HEAD}).encode()))
        assert status == 400 and "268,435,456 pixels" in answer["error"] and "33,554,432 pixels per request" in answer["error"]

    def test_decoding_is_one_request_at_a_time(self, server, monkeypatch):
        import clip_lens.app.api as api_module

        decode, running, most = api_module._rgb, [0], [0]
        lock = threading.Lock()

        def counted(image, what):
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                time.sleep(0.05)
                return decode(image, what)
            finally:
                with lock:
                    running[0] -= 1

        monkeypatch.setattr(api_module, "_rgb", counted)
        body = json.dumps({"images": [png_url(1024, 1024, "RGB")] * 2, "head": HEAD, "k": 2}).encode()
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: exchange(server, post("/api/image_neighbors", body)), range(4)))
        assert [status for status, _, _ in answers] == [200] * 4
        assert most[0] == 1

    def test_byte_budget_queues_and_times_out(self):
        async def scenario():
            budget = ByteBudget(100)
            assert await budget.acquire(60, 1) and budget.free == 40
            waiting = asyncio.ensure_future(budget.acquire(60, 5))
            await asyncio.sleep(0.05)
            assert not waiting.done()
            assert not await budget.acquire(10, 0.05)  # first come, first served: it queues behind the 60
            budget.release(60)
            assert await waiting and budget.free == 40
            budget.release(60)
            assert budget.free == 100 and await budget.acquire(500, 0.01)  # more than all: waits for all
            assert budget.free == 0

        asyncio.run(scenario())


# --- time ------------------------------------------------------------------------------------
def trickle(connection: socket.socket, data: bytes, pause: float) -> bytes:
    """Send ``data`` one byte every ``pause`` seconds until the server answers; the whole answer."""
    connection.settimeout(pause)
    for byte in data:
        try:
            first = connection.recv(65536)  # waits `pause` for an answer
        except socket.timeout:
            try:
                connection.sendall(bytes([byte]))
            except OSError:
                break
            continue
        if first:
            connection.settimeout(10)
            return first + read_reply(connection)
        break
    connection.settimeout(10)
    return read_reply(connection)


@pytest.mark.slow  # each waits out a 1.5 s timeout; the default suite stays under 5 minutes
class TestSlowClients:
    def test_a_trickled_body_gets_408(self, server, no_tracebacks):
        start = time.monotonic()
        with socket.create_connection(server.server_address[:2], timeout=20) as connection:
            connection.sendall(b"POST /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100\r\n\r\n{")
            status, _, answer = parse(trickle(connection, b'"text": "a red shape", "head": "L3H0"' * 2, pause=0.25))
        assert status == 408 and f"within {TIMEOUT:g} seconds" in answer["error"]
        assert TIMEOUT - 0.1 < time.monotonic() - start < TIMEOUT + 2  # the deadline is overall, not per byte

    def test_trickled_headers_get_408(self, server, no_tracebacks):
        start = time.monotonic()
        with socket.create_connection(server.server_address[:2], timeout=20) as connection:
            data = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"x" * 100
            status, _, answer = parse(trickle(connection, data, pause=0.05))
        assert status == 408 and time.monotonic() - start < TIMEOUT + 2

    def test_a_slow_second_request_on_a_kept_alive_connection_gets_408(self, server, no_tracebacks):
        with socket.create_connection(server.server_address[:2], timeout=20) as connection:
            connection.sendall(b"GET /api/sae_status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            first = b""
            while b"\r\n\r\n" not in first:
                first += connection.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            length = int(re.search(rb"content-length: *(\d+)", head, re.IGNORECASE).group(1))
            while len(body) < length:
                body += connection.recv(65536)
            assert head.startswith(b"HTTP/1.1 200") and "saes" in json.loads(body)
            connection.sendall(b"GET /api/info HTTP/1.1\r\nHo")  # the next request stalls
            status, _, answer = parse(read_reply(connection))
        assert status == 408 and "did not arrive" in answer["error"]

    def test_an_idle_connection_is_closed(self, server, no_tracebacks):
        with socket.create_connection(server.server_address[:2], timeout=20) as connection:
            status, _, _ = parse(read_reply(connection))
        assert status == 408


# --- clients that go away ---------------------------------------------------------------------
def abort(connection: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a killed browser tab does."""
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()


def test_closed_clients_leave_no_traceback(server, no_tracebacks):
    address = server.server_address[:2]
    analysis = post("/api/topic_segmentation", json.dumps({"images": [{"scene": 3}], "text": "a red shape"}).encode())
    socket.create_connection(address).close()  # connect, say nothing
    for data in (b"GET /api/in", analysis[:60], analysis[:-5], analysis, b"GET /api/thumbnails?count=64 HTTP/1.1\r\n"
                 b"Host: 127.0.0.1\r\n\r\n", b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"):
        for close in (socket.socket.close, abort):
            connection = socket.create_connection(address)
            connection.sendall(data)
            close(connection)
    time.sleep(1.0)  # the analyses finish for nobody
    status, _, _ = exchange(server, b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    assert status == 200


# --- load --------------------------------------------------------------------------------------
@pytest.mark.slow  # ~7 s
def test_fifty_simultaneous_connections_are_all_answered(server, no_tracebacks):
    """50 connections opened at once, twice, then 60 requests over 4 keep-alive clients: no reset, no 5xx
    (the standard-library server reset 49 of 200 such connections: its listen backlog was 5)."""
    calls = standard_calls(HEAD)
    report = burst(server.server_address[:2], calls, concurrency=50, rounds=2)
    report.add(soak(server.server_address[:2], calls, n=60, clients=4))
    print(report.summary())
    assert report.requests == 160 and report.resets == 0 and report.server_errors == 0, report.summary()
    assert not report.other_errors and not report.unexpected, report.summary()
