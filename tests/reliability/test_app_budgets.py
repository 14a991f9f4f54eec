"""The web app's per-request budgets inside the analyses (issue 27, class 4 and the App bullet), skipped
store rows in the app (class 2) and user text in its figures (class 3).

Each attack of the red-team pass is sent as it was: a 1 MB query text (held the model lock for 13
minutes), a 1×60,000 PNG of 0.4 KB (1.15 GB of memory), 64 KiB of headers, duplicate JSON keys,
``Host: 127.0.0.1:99999``, SIGTERM during a request (the process stayed alive), a store that skipped an
image (thumbnails answered 500) and ``$…$`` queries (500 in five endpoints)."""

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_lens import HookedCLIP
from clip_lens.app import demo_workspace, make_server
from clip_lens.app.api import MAX_ASPECT, MAX_SIDE, MAX_TEXTS
from clip_lens.app.guard import MAX_HEADER_BYTES, MAX_TEXT
from clip_lens.app.server import GRACE_SECONDS
from clip_lens.collect import collect
from clip_lens.sae import SAE, SAEConfig
from tests.helpers import call, serving

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HEAD = "L3H0"
MATHTEXT = ["$\\foo$", "$x^{$"]
"""Queries that matplotlib's mathtext cannot parse (each ended in a 500 before)."""


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def workspace(toy, tmp_path_factory):
    return demo_workspace(toy, tmp_path_factory.mktemp("budgets"), n_scenes=40, progress=False)


def random_sae(model) -> SAE:
    torch.manual_seed(0)
    return SAE(SAEConfig(d_in=model.cfg.d_model, d_sae=16, hook_name="blocks.3.hook_resid_post", model_name="toy-shapes"))


@pytest.fixture(scope="module")
def server(toy, workspace):
    """Default budgets (8 MiB bodies, so that a 1 MB text reaches the analysis)."""
    server = make_server(toy, workspace.store, workspace.labels, thumbnails=workspace.thumbnails,
                         saes={"demo": random_sae(toy)})
    with serving(server):
        yield server


@pytest.fixture(scope="module")
def tight(toy, workspace):
    """Half a second of compute per request."""
    server = make_server(toy, workspace.store, workspace.labels, thumbnails=workspace.thumbnails, compute_timeout=0.5)
    with serving(server):
        yield server


def png_url(width: int, height: int, mode: str = "1", colour=0) -> str:
    buffer = io.BytesIO()
    Image.new(mode, (width, height), colour).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def raw(server, data: bytes, timeout: float = 20) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as connection:
        connection.sendall(data)
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def answers(reply: bytes) -> list[tuple[int, dict, dict]]:
    """Every ``(status, headers, JSON)`` in a stream of answers (several when requests were pipelined)."""
    out = []
    while reply:
        head, _, rest = reply.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        length = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, json.loads(rest[:length])))
        reply = rest[length:]
    return out


def get(path: str, host: str = "127.0.0.1", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n".encode()


# --- 1. text bounds and the compute budget ------------------------------------------------------
class TestTextBounds:
    def test_a_1_mb_query_is_refused_at_once_naming_the_limit(self, server):
        began = time.perf_counter()
        status, answer = call(server, "/api/text_neighbors", {"text": "x" * 2**20, "head": HEAD})
        assert status == 400 and answer["error"] == (f"text is 1,048,576 characters long; the limit is {MAX_TEXT} "
                                                     "characters.")
        assert time.perf_counter() - began < 5  # was 13 minutes with the model lock held

    @pytest.mark.parametrize("endpoint, body, field", [
        ("text_neighbors", {"text": "a", "head": "L" * (MAX_TEXT + 1)}, "head"),
        ("topic_segmentation", {"images": [{"scene": 1}], "text": "a" * (MAX_TEXT + 1)}, "text"),
        ("contrastive_segmentation", {"images": [{"scene": 1}], "text_a": "a", "text_b": "b" * (MAX_TEXT + 1)}, "text_b"),
        ("property_neighbors", {"images": [{"scene": 1}], "property": "colour", "texts": ["red", "r" * (MAX_TEXT + 1)]},
         "texts[1]"),
        ("image_neighbors", {"images": [{"scene": 1}], "head": HEAD, "names": ["n" * (MAX_TEXT + 1)]}, "names[0]"),
        ("sae_features", {"sae": "demo", "text": "s" * (MAX_TEXT + 1)}, "text"),
    ])
    def test_every_text_field_is_bounded(self, server, endpoint, body, field):
        status, answer = call(server, f"/api/{endpoint}", body)
        assert status == 400 and answer["error"] == (f"{field} is {MAX_TEXT + 1} characters long; the limit is "
                                                     f"{MAX_TEXT} characters."), answer

    def test_too_many_texts_are_refused(self, server):
        status, answer = call(server, "/api/property_neighbors", {"images": [{"scene": 1}], "property": "colour",
                                                                  "texts": ["a red shape"] * (MAX_TEXTS + 1)})
        assert status == 400 and answer["error"] == f"texts holds {MAX_TEXTS + 1} texts; the limit is {MAX_TEXTS}."

    def test_a_query_at_the_limit_is_answered(self, server):
        text = ("a red shape on the left " + "z" * MAX_TEXT)[:MAX_TEXT]  # the toy tokenizer takes 30 words at most
        status, answer = call(server, "/api/text_neighbors", {"text": text, "head": HEAD, "k": 2})
        assert status == 200 and len(answer["neighbours"][0]) == 2 and answer["figure"].startswith("data:image/png")


class TestComputeBudget:
    def test_a_request_waiting_for_the_model_gets_503_at_its_deadline(self, tight):
        body = json.dumps({"text": "a red shape", "head": HEAD}).encode()
        tight.api.lock.acquire()  # another analysis holds the model
        try:
            began = time.perf_counter()
            reply = raw(tight, (f"POST /api/text_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
                                f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body)
            waited = time.perf_counter() - began
        finally:
            tight.api.lock.release()
        (status, headers, answer), = answers(reply)
        assert status == 503 and headers["retry-after"] == "2"
        assert answer["error"] == ("the server is busy with other analyses and this one could not start within 0.5 s; "
                                   "try again.")
        assert 0.45 < waited < 3

    def test_an_analysis_past_its_budget_stops_between_images_and_frees_the_model(self, tight, monkeypatch):
        import clip_lens.app.api as api_module

        decode, decoded = api_module._rgb, []

        def slow(image, what):
            decoded.append(what)
            time.sleep(0.3)
            return decode(image, what)

        monkeypatch.setattr(api_module, "_rgb", slow)
        began = time.perf_counter()
        status, answer = call(tight, "/api/image_neighbors", {"images": [{"scene": i} for i in range(8)], "head": HEAD})
        took = time.perf_counter() - began
        assert status == 504 and answer["error"] == (
            "the analysis took longer than its budget of 0.5 s and was stopped after decoding 2 of 8 images; send fewer "
            "or smaller images, or try again when the server is less busy.")
        assert len(decoded) == 2 and took < 3  # 8 images would take 2.4 s
        assert not tight.api.lock.locked() and not tight.api.decode_lock.locked()
        monkeypatch.setattr(api_module, "_rgb", decode)
        status, answer = call(tight, "/api/image_neighbors", {"images": [{"scene": 1}], "head": HEAD, "k": 2})
        assert status == 200 and len(answer["neighbours"][0]) == 2

    def test_a_dashboard_being_computed_answers_503_to_other_requests(self, server):
        view = server.api.features.views["demo"]
        view.state, view.done = "computing", 7
        try:
            status, answer = call(server, "/api/sae_features", {"sae": "demo"})
        finally:
            view.state, view.done = "idle", 0
        assert status == 503 and answer["error"] == ("SAE 'demo': its feature activations over the store are being "
                                                     "computed (7 of 40 images); try again in a few seconds.")
        status, answer = call(server, "/api/sae_features", {"sae": "demo", "count": 3})
        assert status == 200 and len(answer["features"]) == 3


# --- 2. image budgets per side --------------------------------------------------------------------
class TestImageSides:
    def test_a_1_by_60000_png_is_refused_before_preprocessing(self, server, monkeypatch):
        url = png_url(1, 60_000)
        assert len(base64.b64decode(url.split(",")[1])) < 1000  # the red-team's 0.4 KB file
        calls = []
        monkeypatch.setattr(server.api.model, "preprocess", lambda image: calls.append(image))
        status, answer = call(server, "/api/image_neighbors", {"images": [url], "head": HEAD})
        assert status == 400 and answer["error"] == (
            f"images[0] is 1×60000 pixels: its long side is 60,000 times its short side, over the limit of {MAX_ASPECT} "
            "(the model's preprocessing scales the short side up to its input size, and the long side with it); crop "
            "the image.")
        assert calls == []

    def test_a_side_over_the_limit_is_refused(self, server):
        status, answer = call(server, "/api/image_neighbors", {"images": [png_url(MAX_SIDE + 16, 1000)], "head": HEAD})
        assert status == 400 and answer["error"] == (f"images[0] is {MAX_SIDE + 16}×1000 pixels; the limit is "
                                                     f"{MAX_SIDE:,} pixels a side.")

    def test_an_image_at_the_aspect_limit_is_answered(self, server):
        status, answer = call(server, "/api/image_neighbors", {"images": [png_url(20 * MAX_ASPECT, 20, "RGB", (200, 30, 30))],
                                                               "head": HEAD, "k": 2})
        assert status == 200 and len(answer["neighbours"][0]) == 2


# --- 3.-5. headers, strict JSON, Host with its port -----------------------------------------------
class TestHeadersJsonHost:
    def test_64_kib_of_headers_in_one_packet_get_431(self, server):
        headers = "".join(f"X-Filler-{i}: {'x' * 1000}\r\n" for i in range(64))
        request = get("/api/info", extra=headers)
        (status, _, answer), = answers(raw(server, request))
        assert status == 431 and answer["error"] == (f"the request line and headers are {len(request):,} bytes; the limit is "
                                                     f"{MAX_HEADER_BYTES:,} bytes (16 KiB): send fewer or shorter headers")

    def test_headers_under_the_budget_are_answered(self, server):
        headers = "".join(f"X-Filler-{i}: {'x' * 1000}\r\n" for i in range(15))
        (status, _, answer), = answers(raw(server, get("/api/info", extra=headers)))
        assert status == 200 and answer["model"] == "toy-shapes"

    def test_oversized_headers_pipelined_behind_a_request_get_431(self, server):
        first = b"GET /api/info HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        second = get("/api/info", extra=f"X-Filler: {'x' * 20_000}\r\n")
        (status1, _, _), (status2, _, answer) = answers(raw(server, first + second))
        assert status1 == 200 and status2 == 431 and "the limit is 16,384 bytes (16 KiB)" in answer["error"]

    @pytest.mark.parametrize("body, key", [
        (b'{"text": "a red shape", "head": "L3H0", "text": "a blue shape"}', "text"),
        (b'{"text": "a", "head": "L3H0", "k": 2, "k": 3}', "k"),
        (b'{"images": [{"scene": 1, "scene": 2}], "head": "L3H0"}', "scene"),
    ])
    def test_duplicate_keys_are_refused_naming_the_key(self, server, body, key):
        status, answer = call(server, "/api/text_neighbors", data=body)
        assert status == 400 and answer["error"] == ("the body is not valid JSON for this server: the key "
                                                     f"'{key}' appears more than once in one object.")

    def test_host_with_a_foreign_or_invalid_port_is_refused(self, server):
        port = server.server_address[1]
        for host, message in [
            ("127.0.0.1:99999", "Host '127.0.0.1:99999' refused: it is not a host name with an optional port of 1 to 65535"),
            ("127.0.0.1:abc", "Host '127.0.0.1:abc' refused: it is not a host name with an optional port"),
            (f"127.0.0.1:{port + 1}", f"this server answers on port {port}, not {port + 1}"),
            (f"localhost:{port + 1}", f"this server answers on port {port}, not {port + 1}"),
            (f"evil.example:{port}", "Host 'evil.example' refused"),
        ]:
            (status, _, answer), = answers(raw(server, get("/api/info", host)))
            assert status == 403 and message in answer["error"], (host, answer)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
            (status, _, answer), = answers(raw(server, get("/api/info", host)))
            assert status == 200, (host, answer)


# --- 7. a store that skipped an image ---------------------------------------------------------------
COLOURS = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (250, 250, 10), (10, 250, 250)]


@pytest.fixture(scope="module")
def skipped_store(toy, tmp_path_factory):
    """Five solid-colour PNGs and one undecodable file (third by name), collected in chunks of 4."""
    folder = tmp_path_factory.mktemp("skips")
    images = folder / "images"
    images.mkdir()
    names = ["a0.png", "a1.png", "a3.png", "a4.png", "a5.png"]
    for name, colour in zip(names, COLOURS):
        Image.new("RGB", (48, 40), colour).save(images / name)
    (images / "a2.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    store = collect(toy, images, folder / "store", chunk_size=4, batch_size=2, progress=False)
    assert list(store.skipped()) == [2] and store.n_images == 6 and store.n_done == 5
    return store, [str(images / name) for name in names]


@pytest.fixture(scope="module")
def skipped_server(toy, skipped_store):
    server = make_server(toy, skipped_store[0], saes={"demo": random_sae(toy)})
    with serving(server):
        yield server


def thumbnail_colour(url: str) -> tuple:
    picture = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB"))
    return tuple(int(v) for v in np.median(picture.reshape(-1, 3), axis=0))


class TestSkippedRows:
    def test_thumbnails_are_the_rows_after_skips(self, skipped_server):
        status, answer = call(skipped_server, "/api/thumbnails?start=0&count=24")
        assert status == 200, answer  # was 500: row 5 of 6 source rows has no id after the skip
        assert answer["rows"] == [0, 1, 2, 3, 4]
        assert [thumbnail_colour(url) for url in answer["images"]] == COLOURS
        status, answer = call(skipped_server, "/api/thumbnails?start=3&count=5")
        assert status == 200 and answer["rows"] == [3, 4] and [thumbnail_colour(u) for u in answer["images"]] == COLOURS[3:]

    def test_info_and_store_rows_use_the_numbering_after_skips(self, skipped_server, skipped_store):
        status, info = call(skipped_server, "/api/info")
        assert status == 200 and info["store"]["n_images"] == 5
        status, answer = call(skipped_server, "/api/image_neighbors", {"images": [{"store_row": 5}], "head": HEAD})
        assert status == 400 and answer["error"] == "images[0]: store_row must be a row 0..4, got 5."

    @pytest.mark.parametrize("endpoint, body", [
        ("image_neighbors", {"images": [{"store_row": 4}], "head": HEAD, "k": 5}),
        ("text_neighbors", {"text": "a yellow shape", "head": HEAD, "k": 5}),
    ])
    def test_neighbours_name_the_right_files(self, skipped_server, skipped_store, endpoint, body):
        files = skipped_store[1]
        status, answer = call(skipped_server, f"/api/{endpoint}", body)
        assert status == 200, answer
        found = answer["neighbours"][0]
        assert sorted(n["row"] for n in found) == [0, 1, 2, 3, 4]
        assert all(n["id"] == files[n["row"]] for n in found)

    def test_sae_dashboard_covers_the_rows_after_skips(self, skipped_server):
        status, answer = call(skipped_server, "/api/sae_features", {"sae": "demo", "count": 16})
        assert status == 200 and answer["n_images"] == 5, answer
        fired = [row["feature"] for row in answer["features"] if row["frequency"] > 0]
        status, answer = call(skipped_server, "/api/sae_feature", {"sae": "demo", "feature": fired[0], "k": 9})
        assert status == 200 and answer["top"] and all(0 <= top["row"] < 5 for top in answer["top"])
        status, answer = call(skipped_server, "/api/sae_status")
        assert answer["saes"]["demo"] == {"state": "ready", "done": 5, "total": 5}


# --- 8. user text is never mathtext -----------------------------------------------------------------
class TestMathtext:
    @pytest.mark.parametrize("text", MATHTEXT)
    @pytest.mark.parametrize("endpoint, body", [
        ("text_neighbors", lambda t: {"text": t, "head": HEAD, "k": 2}),
        ("topic_segmentation", lambda t: {"images": [{"scene": 1}], "text": t, "names": [t]}),
        ("contrastive_segmentation", lambda t: {"images": [{"scene": 1}], "text_a": t, "text_b": "a shape", "names": [t]}),
        ("image_neighbors", lambda t: {"images": [png_url(32, 32, "RGB")], "names": [t], "head": HEAD, "k": 2}),
        ("property_neighbors", lambda t: {"images": [{"scene": 1}], "names": [t], "property": "colour", "k": 2}),
        ("sae_image", lambda t: {"sae": "demo", "images": [{"scene": 1}], "names": [t], "k": 2}),
    ])
    def test_every_endpoint_that_draws_text_answers_with_a_figure(self, server, workspace, text, endpoint, body):
        request = body(text)
        if endpoint == "property_neighbors":
            request["property"] = next(h.label for h in workspace.labels.by_head().values() if h.label is not None)
        status, answer = call(server, f"/api/{endpoint}", request)
        assert status == 200, answer
        png = base64.b64decode(answer["figure"].split(",", 1)[1])
        assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size[0] > 100


# --- 6. SIGTERM mid-request -------------------------------------------------------------------------
SERVER_SCRIPT = textwrap.dedent('''
    import sys, time
    from clip_lens import HookedCLIP
    from clip_lens.app import api as api_module, demo_workspace
    from clip_lens.app.server import serve

    def stuck(self, body):  # an analysis that does not return: no step to stop at
        with self.hold():
            time.sleep(600)

    decode = api_module._rgb
    def slow_decode(image, what):  # a long analysis with steps: it stops at the next one
        time.sleep(0.2)
        return decode(image, what)

    api_module.Api.text_neighbors = api_module.budgeted(stuck)
    api_module._rgb = slow_decode
    model = HookedCLIP.from_pretrained("toy-shapes")
    workspace = demo_workspace(model, sys.argv[1], n_scenes=8, progress=False)
    serve(model, workspace.store, workspace.labels, port=0, thumbnails=workspace.thumbnails)
    print("serve returned", time.time(), flush=True)
''')


@pytest.mark.slow  # ~15 s: a real server process
def test_sigterm_ends_the_process_even_mid_request(tmp_path):
    script = tmp_path / "server.py"
    script.write_text(SERVER_SCRIPT)
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "demo")], cwd=Path(__file__).parents[2],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = None
        while url is None:
            line = process.stdout.readline()
            assert line, "the server ended before serving"
            if line.startswith("clip-lens app: http"):
                url = line.split()[2]
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        replies: dict[str, bytes] = {}

        def send(name: str, path: str, body: dict) -> None:
            data = json.dumps(body).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                connection.sendall((f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                                    f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data)
                chunks = []
                while chunk := connection.recv(65536):
                    chunks.append(chunk)
                replies[name] = b"".join(chunks)
                replies[name + " at"] = str(time.perf_counter()).encode()

        clients = [threading.Thread(target=send, args=("stuck", "/api/text_neighbors", {"text": "a", "head": HEAD})),
                   threading.Thread(target=send, args=("steps", "/api/image_neighbors",
                                                       {"images": [{"scene": i} for i in range(16)], "head": HEAD}))]
        for client in clients:
            client.start()
        time.sleep(1.0)  # both analyses are running: one stuck holding the model, one decoding
        signalled, signalled_at = time.perf_counter(), time.time()
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        ended = time.perf_counter() - signalled
        for client in clients:
            client.join(10)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0 and "clip-lens app: stopped" in output and "serve returned" in output, output
    returned = float(output.split("serve returned ")[1].split()[0]) - signalled_at
    assert returned < GRACE_SECONDS + 1.5, (returned, output)  # the stuck analysis was abandoned after the grace period
    assert ended < 10, (ended, output)  # before: alive until killed; after serve returns, only Python's own exit
    (status, _, answer), = answers(replies["steps"])
    assert status == 503 and answer["error"] == "the server is shutting down; try again when it is back."
    assert float(replies["steps at"]) - signalled < 1.5  # it stopped at its next image, not at the grace period's end
    (status, _, answer), = answers(replies["stuck"])
    assert status == 503 and "shutting down" in answer["error"]
    assert "Traceback" not in output, output
