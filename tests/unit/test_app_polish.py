"""The app's polish (issue 19): figures titled by what their query images are, colour bars on every
heatmap, no broken preview image, progress while the demo builds, and a clean stop on SIGTERM."""

import base64
import io
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clip_lens import HookedCLIP
from clip_lens.app import Api, demo_workspace
from clip_lens.app.api import Fields
from clip_lens.errors import InputError

N_SCENES = 60


@pytest.fixture(scope="module")
def toy(one_torch_thread):
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def api(toy, tmp_path_factory):
    workspace = demo_workspace(toy, tmp_path_factory.mktemp("polish"), n_scenes=N_SCENES, progress=False)
    return Api(toy, workspace.store, workspace.labels, workspace.thumbnails)


def upload(seed: int = 3) -> str:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def figure_texts(monkeypatch, api, endpoint: str, body: dict) -> tuple[list[str], int]:
    """The titles of the figure's axes and its number of colour bars, caught before it becomes a PNG."""
    import clip_lens.app.api as api_module

    seen = {}
    original = api_module.figure_data_url  # clip_lens.figures.figure_data_url, as both modules call it

    def spy(fig):
        seen["titles"] = [ax.get_title() for ax in fig.axes]
        seen["colour_bars"] = sum(1 for ax in fig.axes if ax.get_label() == "<colorbar>")
        return original(fig)

    monkeypatch.setattr(api_module, "figure_data_url", spy)
    import clip_lens.app.features as features_module

    monkeypatch.setattr(features_module, "figure_data_url", spy)
    answer = getattr(api, endpoint)(body)
    assert answer["figure"].startswith("data:image/png;base64,")
    return seen["titles"], seen["colour_bars"]


class TestFigureLabels:
    def test_query_names(self, api):
        fields = Fields({"images": [{"store_row": 3}, {"scene": 5}, upload(), upload(4)], "names": [None, None, "cat.png", ""]},
                        ("images", "names"))
        assert api.query_names(fields) == ["store image #3", "scene 5 (seed 1000)", "cat.png", "uploaded image 4"]
        assert api.query_names(Fields({"images": [upload()]}, ("images", "names"))) == ["uploaded image"]
        with pytest.raises(InputError, match="names must be a list of 1 strings"):
            api.query_names(Fields({"images": [upload()], "names": ["a", "b"]}, ("images", "names")))

    def test_neighbour_figures_name_store_rows(self, api, monkeypatch):
        body = {"images": [{"store_row": 3}], "head": "L0H0", "k": 4}
        titles, bars = figure_texts(monkeypatch, api, "image_neighbors", body)
        assert titles[0] == "store image #3" and not any(t.startswith("query") for t in titles)
        prop = api.info()["properties"][0]
        titles, _ = figure_texts(monkeypatch, api, "property_neighbors",
                                 {"images": [upload()], "names": ["my shapes.png"], "property": prop, "k": 3})
        assert titles[0] == "my shapes.png"

    @pytest.mark.parametrize("endpoint, body", [
        ("topic_segmentation", {"text": "a red shape"}),
        ("contrastive_segmentation", {"text_a": "a red shape", "text_b": "a blue shape"}),
    ])
    def test_heatmaps_have_a_colour_bar_and_named_rows(self, api, monkeypatch, endpoint, body):
        titles, bars = figure_texts(monkeypatch, api, endpoint, {"images": [{"store_row": 7}, {"scene": 2}], **body})
        assert bars == 1
        assert "store image #7" in titles and "scene 2 (seed 1000)" in titles


def test_page_shows_no_broken_image_before_a_query_is_chosen():
    static = Path(__file__).resolve().parents[2] / "clip_lens" / "app" / "static"
    page = (static / "index.html").read_text()
    tag = page[page.index('<img id="preview"'):]
    tag = tag[:tag.index(">") + 1]
    assert "hidden" in tag and "src=" not in tag  # no image until one is chosen
    script = (static / "app.js").read_text()
    assert '$("#preview").hidden = false;' in script and "body.names = [state.name];" in script


def test_demo_workspace_prints_its_progress(toy, tmp_path, capsys):
    demo_workspace(toy, tmp_path, n_scenes=20)
    err = capsys.readouterr().err
    assert "demo [1/2] collecting 20 shapes-world scenes" in err and "demo [2/2] TextSpan" in err
    assert "demo ready in" in err


def _lines(stream, into: "queue.Queue[str]") -> None:
    for line in stream:
        into.put(line)
    into.put("")


@pytest.mark.slow  # a real server process per signal: ~11 s each
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_app_stops_cleanly_on_a_signal_and_removes_its_temp_folder(tmp_path, signum):
    cli = Path(sys.executable).parent / "clip-lens"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([str(cli), "app", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env=env)
    lines: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=_lines, args=(process.stdout, lines), daemon=True).start()
    output, deadline = [], time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            output.append(line)
            if line == "" or "clip-lens app: http" in line:
                break
        text = "".join(output)
        assert "clip-lens app: http" in text, text
        assert "demo [1/3] collecting" in text  # progress while the demo store builds
        assert len(list(tmp_path.glob("clip_lens_app_*"))) == 1  # the demo folder exists while serving
        process.send_signal(signum)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert list(tmp_path.glob("clip_lens_app_*")) == []
