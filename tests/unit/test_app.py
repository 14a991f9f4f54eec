"""The web app's HTTP API (`clip-lens app`): the five analyses on the shapes world, and bad input."""

import base64
import io
import json
import logging
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from clip_lens import HookedCLIP, analyses
from clip_lens.app import demo_workspace, make_server
from clip_lens.errors import InputError
from clip_lens.toy.world import ShapesWorld
from tests.helpers import call, serving

STORE_SEED, QUERY_SEED, N_SCENES = 2024, 1000, 120
MAX_UPLOAD = 200_000  # small, so that the oversize request stays cheap


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def workspace(toy, tmp_path_factory):
    return demo_workspace(toy, tmp_path_factory.mktemp("app"), n_scenes=N_SCENES, seed=STORE_SEED)


@pytest.fixture(scope="module")
def server(toy, workspace):
    server = make_server(toy, workspace.store, workspace.labels, max_upload_bytes=MAX_UPLOAD, max_images=8,
                         thumbnails=workspace.thumbnails)
    with serving(server):
        yield server


def png_url(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decoded(url: str) -> Image.Image:
    assert url.startswith("data:image/png;base64,")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    image.load()
    return image


def inside_outside(grid: list, mask: np.ndarray) -> tuple[float, float]:
    """Means of a patch grid inside and outside a pixel mask, weighted by each patch's covered fraction."""
    grid = np.asarray(grid)
    side = mask.shape[0] // grid.shape[0]
    covered = mask.reshape(grid.shape[0], side, grid.shape[1], side).mean((1, 3))
    return (grid * covered).sum() / covered.sum(), (grid * (1 - covered)).sum() / (1 - covered).sum()


def assert_neighbours(answer: dict, n_queries: int, k: int) -> None:
    assert len(answer["neighbours"]) == n_queries
    for neighbours in answer["neighbours"]:
        scores = [n["score"] for n in neighbours]
        assert len(neighbours) == k and scores == sorted(scores, reverse=True)
        assert all(0 <= n["row"] < N_SCENES and n["id"] == str(n["row"]) for n in neighbours)
    figure = decoded(answer["figure"])
    assert figure.width >= 200 and figure.height >= 100 * n_queries


@pytest.fixture(scope="module")
def red_scenes():
    """Held-out scenes with a red object."""
    world = ShapesWorld(seed=QUERY_SEED, image_size=64)
    return [scene for scene in map(world.scene, range(40)) if scene.attribute_mask("colour", "red").any()][:4]


class TestPageAndInfo:
    def test_binds_to_loopback_by_default(self, server):
        assert server.server_address[0] == "127.0.0.1" and server.loopback_only

    def test_info_fills_the_controls(self, server, toy):
        status, info = call(server, "/api/info")
        assert status == 200
        assert info["model"] == "toy-shapes" and (info["n_layers"], info["n_heads"]) == (4, 4)
        assert [h["key"] for h in info["heads"]] == [f"L{l}H{h}" for l in range(4) for h in range(4)]
        assert "colour" in info["properties"] and {"dot", "cosine"} <= set(info["metrics"])
        assert any(h["label"] == "colour" for h in info["heads"])
        assert info["store"]["n_images"] == N_SCENES and info["store"]["has_images"]
        assert info["limits"] == {"max_images": 8, "max_k": 32, "max_pixels": 32 * 2**20, "max_upload_bytes": MAX_UPLOAD}

    @pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/app.css"])
    def test_page_is_served_with_no_external_resource(self, server, path):
        with urllib.request.urlopen(server.url + path.lstrip("/")) as response:
            text = response.read().decode()
            assert response.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert "http://" not in text and "https://" not in text
        if path == "/":
            assert '<script src="/static/app.js"' in text and 'data-tab="text_neighbors"' in text

    def test_thumbnails_are_the_store_images(self, server):
        status, page = call(server, "/api/thumbnails?start=5&count=3")
        assert status == 200 and page["rows"] == [5, 6, 7]
        world = ShapesWorld(seed=STORE_SEED, image_size=64)
        for row, url in zip(page["rows"], page["images"]):
            assert np.array_equal(np.asarray(decoded(url).convert("RGB")), world.scene(row).image)


class TestAnalyses:
    def test_property_search_by_colour_finds_the_query_colour(self, server):
        world, queries = ShapesWorld(seed=STORE_SEED, image_size=64), ShapesWorld(seed=QUERY_SEED, image_size=64)
        images = [png_url(queries.scene(i).image) for i in range(6)]  # uploads of held-out scenes
        status, answer = call(server, "/api/property_neighbors", {"images": images, "property": "colour", "k": 5})
        assert status == 200, answer
        assert_neighbours(answer, n_queries=6, k=5)
        assert answer["property"] == "colour" and answer["metric"] == "dot" and answer["heads"]
        same = [world.scene(n["row"]).value("colour") == queries.scene(q).value("colour")
                for q, neighbours in enumerate(answer["neighbours"]) for n in neighbours]
        assert np.mean(same) >= 0.6  # chance: 1/8

    def test_concepts_search_keeps_the_colour_and_ignores_the_shape(self, server):
        from clip_lens.toy.world import VALUES, attribute_prompt

        world, queries = ShapesWorld(seed=STORE_SEED, image_size=64), ShapesWorld(seed=QUERY_SEED, image_size=64)
        texts = [attribute_prompt("colour", c) for c in VALUES["colour"]]
        body = {"images": [{"scene": i} for i in range(8)], "property": "colour", "k": 5, "metric": "concepts", "texts": texts}
        status, answer = call(server, "/api/property_neighbors", body)
        assert status == 200, answer
        pairs = [(world.scene(n["row"]), queries.scene(q)) for q, neighbours in enumerate(answer["neighbours"]) for n in neighbours]
        colour = np.mean([a.value("colour") == b.value("colour") for a, b in pairs])
        shape = np.mean([a.value("shape") == b.value("shape") for a, b in pairs])
        assert colour >= 0.9 and shape <= 0.3, (colour, shape)  # chance: 1/8 and 1/6
        status, answer = call(server, "/api/property_neighbors", {**body, "texts": ["a red shape", ""]})
        assert status == 400 and "texts must be a list of non-empty strings" in answer["error"]

    def test_topic_map_is_higher_on_the_object_the_text_names(self, server, red_scenes):
        images = [png_url(scene.image) for scene in red_scenes]
        status, answer = call(server, "/api/topic_segmentation", {"images": images, "text": "a red shape", "head": "all"})
        assert status == 200, answer
        assert len(answer["heads"]) == 16 and len(answer["grid"]) == len(red_scenes)
        for scene, grid in zip(red_scenes, answer["grid"]):
            inside, outside = inside_outside(grid, scene.attribute_mask("colour", "red"))
            assert inside > outside
        assert decoded(answer["figure"]).height >= 100 * len(red_scenes)

    def test_topic_map_of_one_head(self, server):
        body = {"images": [{"scene": 4}], "text": "a red shape", "head": "L0H3"}
        status, answer = call(server, "/api/topic_segmentation", body)
        assert status == 200 and answer["heads"] == ["L0H3"] and np.asarray(answer["grid"]).shape == (1, 8, 8)

    def test_contrastive_map_favours_the_named_colour_on_its_object(self, server, red_scenes):
        body = {"images": [{"scene": s.index, "seed": QUERY_SEED} for s in red_scenes], "text_a": "a red shape",
                "text_b": "a blue shape"}
        status, answer = call(server, "/api/contrastive_segmentation", body)
        assert status == 200, answer
        np.testing.assert_allclose(answer["b_minus_a"], -np.asarray(answer["a_minus_b"]), atol=1e-7)
        for scene, grid in zip(red_scenes, answer["a_minus_b"]):
            inside, outside = inside_outside(grid, scene.attribute_mask("colour", "red"))
            assert inside > outside
        decoded(answer["figure"])

    def test_image_neighbours_of_one_head_match_the_analysis(self, server, toy, workspace):
        status, answer = call(server, "/api/image_neighbors", {"images": [{"store_row": 7}], "head": "L1H2", "k": 6})
        assert status == 200, answer
        assert_neighbours(answer, n_queries=1, k=6)
        pixels = toy.preprocess(Image.fromarray(workspace.thumbnails([7])[0]))[None]
        direct = analyses.get("neighbors")(toy).run(workspace.store, query_images=pixels, head="L1H2", k=6)
        assert [n["row"] for n in answer["neighbours"][0]] == direct.indices[0].tolist()
        np.testing.assert_allclose([n["score"] for n in answer["neighbours"][0]], direct.scores[0].numpy(), rtol=1e-5)

    def test_text_neighbours_of_a_colour_head_have_that_colour(self, server, workspace):
        head = [h.head for h in workspace.labels.heads if h.label == "colour"][-1]
        status, answer = call(server, "/api/text_neighbors", {"text": "a red shape", "head": head, "k": 5})
        assert status == 200, answer
        assert_neighbours(answer, n_queries=1, k=5)
        world = ShapesWorld(seed=STORE_SEED, image_size=64)
        assert sum(world.scene(n["row"]).value("colour") == "red" for n in answer["neighbours"][0]) >= 4

    def test_concurrent_requests_get_the_same_answers(self, server):
        body = {"images": [{"store_row": 3}], "text": "a blue shape", "head": "all"}
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda _: call(server, "/api/topic_segmentation", body), range(4)))
        assert all(status == 200 for status, _ in answers)
        assert all(answer["grid"] == answers[0][1]["grid"] for _, answer in answers)


IMAGE = {"store_row": 0}
NOT_AN_IMAGE = "data:image/png;base64," + base64.b64encode(b"plain text, not an image").decode()
TRUNCATED_PNG = png_url(ShapesWorld(seed=0, image_size=64).scene(0).image)[:22 + 400]  # whole base64 quads


class TestBadInput:
    @pytest.mark.parametrize("path, body, message", [
        ("topic_segmentation", {"images": [IMAGE], "text": "a red shape", "head": "L9H0"}, "head L9H0 does not exist"),
        ("image_neighbors", {"images": [IMAGE], "head": "L4H0", "k": 3}, "head L4H0 is not in the store"),
        ("text_neighbors", {"text": "a red shape", "head": "head3", "k": 3}, "is not of the form"),
        ("property_neighbors", {"images": [IMAGE], "property": "colr", "k": 3}, "Did you mean: colour"),
        ("property_neighbors", {"images": [IMAGE], "property": "colour", "metric": "euclid"}, "metric must be one of"),
        ("text_neighbors", {"text": "", "head": "L3H0"}, "text must be a non-empty string"),
        ("topic_segmentation", {"images": [IMAGE], "text": "   "}, "text must be a non-empty string"),
        ("contrastive_segmentation", {"images": [IMAGE], "text_a": "a red shape"}, "text_b must be a non-empty string"),
        ("image_neighbors", {"images": [IMAGE], "head": "L3H0", "k": 0}, "k must be a whole number from 1 to 32"),
        ("image_neighbors", {"images": [IMAGE], "head": "L3H0", "k": "5"}, "k must be a whole number"),
        ("image_neighbors", {"images": [IMAGE], "head": "L3H0", "k": 2.5}, "k must be a whole number"),
        ("image_neighbors", {"images": [IMAGE], "head": "L3H0", "k": True}, "k must be a whole number"),
        ("image_neighbors", {"images": [IMAGE], "head": "L3H0", "k": 33}, "k must be a whole number from 1 to 32"),
        ("image_neighbors", {"images": [IMAGE], "head": 3}, "head must be a string"),
        ("image_neighbors", {"images": [IMAGE], "hed": "L3H0"}, "unknown field 'hed'. Did you mean: head?"),
        ("image_neighbors", {"images": [], "head": "L3H0"}, "images must be a non-empty list"),
        ("image_neighbors", {"images": [IMAGE] * 9, "head": "L3H0"}, "at most 8 images per request, got 9"),
        ("image_neighbors", {"images": [{"store_row": 120}], "head": "L3H0"}, "store_row must be a row 0..119"),
        ("image_neighbors", {"images": [{"path": "/etc/passwd"}], "head": "L3H0"}, "images[0] must be a data URL"),
        ("image_neighbors", {"images": [NOT_AN_IMAGE], "head": "L3H0"}, "images[0] is not a PNG/JPEG/GIF/WEBP/BMP image"),
        ("image_neighbors", {"images": [IMAGE, TRUNCATED_PNG], "head": "L3H0"}, "images[1] cannot be decoded"),
        ("image_neighbors", {"images": ["data:image/png;base64,@@@"], "head": "L3H0"}, "base64 data cannot be decoded"),
        ("image_neighbors", {"images": ["/etc/passwd"], "head": "L3H0"}, "is not a base64 image data URL"),
        ("image_neighbors", [1, 2], "must be a JSON object"),
    ])
    def test_refused_with_the_reason(self, server, path, body, message):
        status, answer = call(server, f"/api/{path}", body)
        assert status == 400 and answer["status"] == 400
        assert message in answer["error"]

    def test_images_over_the_pixel_limit_are_refused_before_decoding(self, server):
        buffer = io.BytesIO()
        Image.new("1", (5000, 4000)).save(buffer, format="PNG")  # small file, 20 megapixels
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        status, answer = call(server, "/api/image_neighbors", {"images": [url], "head": "L3H0"})
        assert status == 400 and "5000×4000 pixels" in answer["error"]

    def test_oversize_body_gets_413(self, server):
        url = "data:image/png;base64," + "A" * MAX_UPLOAD
        status, answer = call(server, "/api/image_neighbors", {"images": [url], "head": "L3H0"})
        assert status == 413 and f"over the limit of {MAX_UPLOAD:,} bytes" in answer["error"]

    def test_oversize_body_is_refused_before_it_is_sent(self, server):
        with socket.create_connection(server.server_address, timeout=10) as connection:
            connection.sendall(b"POST /api/image_neighbors HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                               b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n")
            reply = connection.makefile("rb").read()  # the server answers and closes: no body was sent
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.0 413") or head.startswith(b"HTTP/1.1 413")
        assert "over the limit" in json.loads(body)["error"]

    def test_invalid_json_and_wrong_content_type(self, server):
        assert call(server, "/api/text_neighbors", data=b"{not json")[0] == 400
        status, answer = call(server, "/api/text_neighbors", data=b"{}", headers={"Content-Type": "text/plain"})
        assert status == 415 and "application/json" in answer["error"]

    @pytest.mark.parametrize("data", [None, b"{}"])
    def test_unknown_path_is_404(self, server, data):
        status, answer = call(server, "/api/nothing_here", data=data)
        assert status == 404 and "/api/nothing_here" in answer["error"]

    def test_foreign_host_header_is_refused(self, server):
        status, answer = call(server, "/api/info", headers={"Host": "attacker.example"})
        assert status == 403 and "attacker.example" in answer["error"]

    def test_internal_errors_give_no_traceback(self, server, caplog, monkeypatch):
        monkeypatch.setattr(server.api, "thumbnail_loader", lambda rows: 1 / 0)
        with caplog.at_level(logging.ERROR, logger="clip_lens.app"):
            status, answer = call(server, "/api/thumbnails?start=0&count=2")
        assert status == 500 and answer["error"] == "internal error in the analysis; see the server log"
        assert "ZeroDivisionError" in caplog.text  # the traceback is logged on the server

    def test_bad_server_settings_are_refused(self, toy, workspace, server):
        with pytest.raises(InputError, match="cannot listen on 127.0.0.1"):
            make_server(toy, workspace.store, port=server.server_address[1])  # taken
        with pytest.raises(InputError, match="max_upload_bytes"):
            make_server(toy, workspace.store, max_upload_bytes=0)
        with pytest.raises(InputError, match="max_images"):
            make_server(toy, workspace.store, max_images=0)


def test_shutdown_before_serving_returns_at_once_then_it_serves(toy, workspace):
    server = make_server(toy, workspace.store, workspace.labels)
    server.shutdown()  # e.g. a thread that was started but has not run yet
    server.serve_forever()  # returns at once
    with serving(server):
        status, answer = call(server, "/api/info")
    assert status == 200 and answer["model"] == "toy-shapes"


@pytest.mark.slow  # a fresh interpreter per check (6 s); the default suite stays under 5 minutes
def test_the_server_stack_is_imported_only_when_a_server_runs():
    """`clip-lens` and `import clip_lens.app` do not import Starlette or uvicorn."""
    code = ("import sys, clip_lens.cli, clip_lens.app; "
            "print(sorted(m for m in ('starlette', 'uvicorn', 'clip_lens.app.asgi') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_cli_app_refuses_a_missing_store_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from tests.helpers import one_line_error

    one_line_error(CliRunner(), ["app", "--store", tmp_path / "missing"], "is not a clip_lens store")
