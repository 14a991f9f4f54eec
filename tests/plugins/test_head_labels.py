"""The head_labels plugin: prototype labeler (fake embeddings and the bundled toy model), LLM labeler
against a local fake endpoint, the result table and the registry."""

from __future__ import annotations

import json
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from matplotlib.figure import Figure

import clip_lens
import clip_lens.analyses
from clip_lens.errors import ClipLensError, InputError
from clip_lens.toy.texts import vocabulary
from clip_lens.toy.tokenizer import WordTokenizer
from clip_lens.toy.world import VALUES
from clip_lens_plugins.head_labels import (
    HeadLabels, HeadLabelsResult, LabelerError, LLMLabeler, PrototypeLabeler,
)
from clip_lens.toy.texts import DISTRACTORS
from clip_lens.toy.world import ATTRIBUTES, attribute_prompt
from clip_lens_plugins.head_labels.labelers import (
    calibrate, calibration_half, general_prototypes, load_prompt, render_texts, resolve_prototypes, shapes_prototypes,
    world_texts,
)

PROTOTYPES = {"colour": ["red", "blue", "green"], "shape": ["circle", "square"], "animal": ["dog", "cat"]}
WORDS = ["red", "blue", "green", "circle", "square", "dog", "cat", "thing"]


class BagOfWords:
    """Deterministic fake text encoder: word counts over WORDS; records every call."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> torch.Tensor:
        self.calls.append(list(texts))
        return torch.tensor([[float(text.split().count(w)) for w in WORDS] for text in texts])


# --- prototype labeler -------------------------------------------------------------------------
class TestPrototypeLabeler:
    SPANS = {
        "L0H0": ["red", "a blue thing", "dog", "green"],   # colour 3 of 4
        "L0H1": ["circle", "cat", "dog", "square"],        # shape 2 = animal 2: circle ranks first
        "L1H0": ["dog", "circle", "cat", "square"],        # same texts, dog ranks first
        "L1H1": ["red", "circle", "dog"],                  # 1/3 each: below min_confidence 0.4
    }

    def test_labels_confidences_and_fits(self):
        heads = {h.head: h for h in PrototypeLabeler(BagOfWords(), PROTOTYPES).label(self.SPANS)}
        assert [(h.label, h.confidence, h.fits) for h in heads.values()] == [
            ("colour", 3 / 4, [True, True, False, True]),
            ("shape", 2 / 4, [True, False, False, True]),
            ("animal", 2 / 4, [True, False, True, False]),
            (None, 1 / 3, [False, False, False]),
        ]
        assert heads["L0H1"].texts == self.SPANS["L0H1"]

    def test_min_confidence(self):
        heads = PrototypeLabeler(BagOfWords(), PROTOTYPES, min_confidence=0.8).label(self.SPANS)
        assert [h.label for h in heads] == [None, None, None, None]
        assert [h.confidence for h in heads] == [3 / 4, 2 / 4, 2 / 4, 1 / 3]
        assert PrototypeLabeler(BagOfWords(), PROTOTYPES, min_confidence=0.0).label({"L1H1": ["red", "circle", "dog"]})[0].label == "colour"

    def test_each_distinct_text_is_embedded_once_in_one_batch(self):
        encode = BagOfWords()
        labeler = PrototypeLabeler(encode, PROTOTYPES)
        labeler.label(self.SPANS)
        labeler.label({"L2H0": ["cat"]})
        assert encode.calls == [
            ["red", "blue", "green", "circle", "square", "dog", "cat"],  # prototype phrases, once
            ["red", "a blue thing", "dog", "green", "circle", "cat", "square"],
            ["cat"],
        ]

    def test_fits(self):
        labeler = PrototypeLabeler(BagOfWords(), PROTOTYPES)
        texts = ["blue", "cat", "red circle", "square thing"]
        assert labeler.fits(texts, "colour") == [True, False, True, False]  # "red circle" ties: colour is listed first
        assert labeler.fits(texts, "shape") == [False, False, False, True]
        assert labeler.fits(texts, None) == [False] * 4
        with pytest.raises(InputError, match="'color' is not a property.*Did you mean: colour"):
            labeler.fits(texts, "color")

    def test_bad_arguments(self):
        with pytest.raises(InputError, match="non-empty list"):
            PrototypeLabeler(BagOfWords(), {"colour": []})
        with pytest.raises(InputError, match=r"min_confidence .* \[0, 1\]"):
            PrototypeLabeler(BagOfWords(), PROTOTYPES, min_confidence=1.5)
        with pytest.raises(InputError, match=r"encode must return a \[7, d\] tensor for 7 texts, got \(8,\)"):
            PrototypeLabeler(lambda texts: torch.ones(8), PROTOTYPES).label({"L0H0": ["red"]})


class TestPrototypeSets:
    def test_shapes_set_covers_the_world_in_its_vocabulary(self):
        prototypes = shapes_prototypes()
        assert list(prototypes) == ["colour", "shape", "size", "position", "background"]  # the world's attribute names
        assert [len(p) for p in prototypes.values()] == [len(VALUES[a]) for a in ("colour", "shape", "size", "position", "background")]
        assert prototypes["colour"][0] == "a red shape" and prototypes["position"][0] == "a shape at the top left"
        tokens = WordTokenizer(vocabulary())([p for phrases in prototypes.values() for p in phrases])
        assert not (tokens == 1).any(), "a shapes-world prototype uses a word outside the toy vocabulary"

    def test_general_set(self):
        prototypes = general_prototypes()
        assert {"colour", "shape", "location", "texture", "count", "animal", "object", "scene", "art_style", "photography",
                "people", "letters", "nature"} <= set(prototypes)
        assert all(8 <= len(p) <= 15 and len(set(p)) == len(p) for p in prototypes.values())

    def test_auto_picks_by_model_name(self):
        assert resolve_prototypes("auto", "toy-shapes") == shapes_prototypes()
        assert resolve_prototypes("auto", "ViT-B-16") == general_prototypes()
        assert resolve_prototypes(PROTOTYPES) == PROTOTYPES
        with pytest.raises(InputError, match="Did you mean: shapes"):
            resolve_prototypes("shape")


@pytest.fixture(scope="module")
def toy():
    return clip_lens.HookedCLIP.from_pretrained("toy-shapes")


def test_toy_model_labels_colour_and_position_heads(toy):
    spans = {
        "L3H1": ["a red shape", "a blue shape", "a green shape"],
        "L2H0": ["a shape at the top left", "a shape on the right", "a circle"],
    }
    result = HeadLabels(toy).run(spans)
    assert (result.model, result.labeler, result.properties) == ("toy-shapes", "prototype", list(shapes_prototypes()))
    assert [(h.head, h.label, h.confidence, h.fits) for h in result.heads] == [
        ("L2H0", "position", 2 / 3, [True, True, False]),
        ("L3H1", "colour", 1.0, [True, True, True]),
    ]
    labeler = PrototypeLabeler.from_model(toy, batch_size=16)  # 28 phrases: two text-tower passes
    assert labeler.fits(["a circle", "a large shape", "a shape on a dotted background"], "shape") == [True, False, False]


@pytest.fixture(scope="module")
def toy_labeler(toy):
    return PrototypeLabeler.from_model(toy)


class TestAbstentionAgainstGroundTruth:
    """The calibrated toy labeler judged on the shapes world's texts, whose attributes are known."""

    def test_distractors_fit_no_property_unless_they_name_a_world_value(self, toy_labeler):
        words = {a: {w for v in VALUES[a] for w in v.split()} for a in ATTRIBUTES}
        for text, found in zip(DISTRACTORS, toy_labeler.nearest(DISTRACTORS)):
            named = {a for a in ATTRIBUTES if words[a] & set(text.split())}  # "a red car": red is a world colour
            assert found is None or found in named, f"{text!r} fits {found}"
            assert [toy_labeler.fits([text], p)[0] for p in toy_labeler.properties].count(True) <= len(named)

    def test_evaluation_prompts_fit_their_attribute_and_only_it(self, toy_labeler):
        prompts = [(a, attribute_prompt(a, v)) for a in ATTRIBUTES for v in VALUES[a] if not calibration_half(attribute_prompt(a, v))]
        assert len(prompts) >= 10
        for attribute, text in prompts:
            assert {p for p in toy_labeler.properties if toy_labeler.fits([text], p)[0]} == {attribute}, text

    def test_abstains_on_a_head_of_distractors_and_labels_size_prompts_size(self, toy_labeler):
        plain = [t for t in DISTRACTORS if not {"red", "black", "white"} & set(t.split())][:5]
        sizes = [attribute_prompt("size", v) for v in VALUES["size"]]
        none, size = toy_labeler.label({"L0H0": plain, "L0H1": sizes})
        assert (none.label, none.abstention, none.fits) == (None, "none", [False] * 5)
        assert (size.label, size.abstention, size.fits, size.confidence) == ("size", None, [True, True], 1.0)

    def test_calibration_reads_only_the_calibration_half(self, toy):
        encode = PrototypeLabeler.from_model(toy, prototypes="general").encode
        truth = world_texts(1)
        reference = calibrate(encode, shapes_prototypes(1), truth)
        changed = {t: (frozenset() if not calibration_half(t) else a) for t, a in truth.items()}  # evaluation half: all "unrelated"
        extra = [t for t in (f"a {w} extra text" for w in ("first", "second", "third", "fourth", "fifth")) if not calibration_half(t)]
        assert extra
        changed.update({t: frozenset({"colour"}) for t in extra})
        moved = calibrate(encode, shapes_prototypes(1), changed)
        assert moved.threshold == reference.threshold and moved.none == reference.none
        assert all(calibration_half(t) for t in reference.texts) and set(reference.texts) == {t for t in truth if calibration_half(t)}


# --- LLM labeler -------------------------------------------------------------------------------
class FakeLLM(BaseHTTPRequestHandler):
    """Records each request on the server; answers with ``server.reply(body) -> (status, bytes, delay)``."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
        status, payload, delay = self.server.reply(body)
        time.sleep(delay)
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except OSError:  # the client gave up waiting (timeout test)
            pass

    def log_message(self, *args):
        pass


def chat(content: str, delay: float = 0.0) -> tuple[int, bytes, float]:
    return 200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode(), delay


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeLLM)
    httpd.daemon_threads = True
    httpd.requests = []
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


KEY = "sk-test-secret"


def llm(server, **kwargs) -> LLMLabeler:
    return LLMLabeler(url=server.url, model="test-model", api_key=KEY, **kwargs)


def test_llm_labels_each_head_with_one_request(server):
    def reply(body):
        question = body["messages"][-1]["content"]
        if "a red car" in question:
            return chat('{"label": "colour", "fits": [true, false, true]}')
        return chat('```json\n{"label": null, "fits": [true, false]}\n```')  # fenced; null label fits nothing

    server.reply = reply
    spans = {"L0H0": ["a red car", "a dog", "blue sky"], "L1H2": ["a sandwich", "text"]}
    result = HeadLabels(labeler=llm(server)).run(spans, model_name="ViT-B-16")
    assert result.labeler == "llm:test-model" and result.properties == []
    assert [(h.head, h.label, h.confidence, h.fits) for h in result.heads] == [
        ("L0H0", "colour", 2 / 3, [True, False, True]),
        ("L1H2", None, 0.0, [False, False]),
    ]
    assert len(server.requests) == 2
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {KEY}"
    assert (request["body"]["model"], request["body"]["temperature"]) == ("test-model", 0)
    messages = request["body"]["messages"]
    examples = load_prompt().examples
    assert len(examples) == 4 and len(messages) == 1 + 2 * len(examples) + 1
    assert messages[0]["role"] == "system" and "You label attention heads" in messages[0]["content"]
    assert messages[1] == {"role": "user", "content": render_texts(examples[0]["texts"])}
    assert json.loads(messages[2]["content"]) == {"label": "colour", "fits": [True, True, True, False, True]}
    assert messages[-1] == {"role": "user", "content": "Texts:\n1. a red car\n2. a dog\n3. blue sky"}


def test_llm_judge(server):
    server.reply = lambda body: chat('{"fits": [true, false]}')
    assert llm(server).fits(["a purple flower", "a dog"], "colour") == [True, False]
    messages = server.requests[0]["body"]["messages"]
    assert "You check whether texts express" in messages[0]["content"]
    assert messages[1]["content"] == "Property: colour\nTexts:\n1. a purple flower\n2. a dog"
    assert llm(server).fits(["a dog"], None) == [False] and len(server.requests) == 1  # nothing to ask


def test_llm_properties_constrain_labels(server, toy):
    server.reply = lambda body: chat('{"label": "animal", "fits": [true, true]}')
    labels = HeadLabels(toy, labeler="llm", url=server.url, llm_model="test-model")
    assert labels.labeler.properties == ["colour", "shape", "size", "position", "background"]  # the toy model's set
    with pytest.raises(LabelerError, match="head L0H0: the model answered label 'animal', which is not one of the allowed"):
        labels.run({"L0H0": ["a cat", "a dog"]})
    messages = server.requests[0]["body"]["messages"]
    assert "Allowed labels: colour, shape, size, position, background, or null" in messages[0]["content"]
    shown = [json.loads(m["content"])["label"] for m in messages if m["role"] == "assistant"]
    assert shown == ["colour", None]  # the 'location' and 'animal' examples (not toy properties) are left out


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"


@pytest.mark.parametrize(
    "reply, timeout, message",
    [
        (chat('{"label": "colour"}'), 30, r"has keys \['label'\], expected exactly \['fits', 'label'\]"),
        (chat('{"label": "colour", "fits": [true]}'), 30, "'fits' must be 3 true/false values, one per text"),
        (chat('{"label": 7, "fits": [true, true, true]}'), 30, "the label must be a property name or null, got 7"),
        (chat("The label is colour."), 30, "answer is not a JSON object.*'The label is colour.'"),
        ((200, b"<html>gateway</html>", 0), 30, "did not answer JSON .*<html>gateway.*API base"),
        ((200, b'{"id": 1}', 0), 30, "did not answer a chat completion"),
        ((500, b"internal error", 0), 30, "answered HTTP 500 Internal Server Error: internal error. Check the URL"),
        (chat('{"label": "colour", "fits": [true, true, true]}', delay=2.0), 0.5, "no answer from .* within 0.5 s; raise timeout="),
    ],
    ids=["wrong-keys", "fits-length", "label-type", "content-not-json", "body-not-json", "not-chat", "http-500", "timeout"],
)
def test_llm_errors_are_clear(server, reply, timeout, message):
    server.reply = lambda body: reply
    start = time.perf_counter()
    with pytest.raises(LabelerError, match=message) as caught:
        llm(server, timeout=timeout).label({"L0H0": ["a red car", "a dog", "blue sky"]})
    assert time.perf_counter() - start < 1.9  # the slow reply takes 2 s: the timeout cut it short
    error = caught.value
    assert isinstance(error, ClipLensError) and isinstance(error, RuntimeError)
    assert str(error).startswith("LLM labeler, head L0H0: ")
    shown = "".join(traceback.format_exception(error))
    assert "urllib" not in shown and "JSONDecodeError" not in shown  # the message alone, no chained traceback


def test_llm_unreachable_and_key_never_shown(server):
    labeler = LLMLabeler(url=closed_port_url(), model="m", api_key=KEY)
    with pytest.raises(LabelerError, match="cannot reach .* check CLIP_LENS_LLM_URL") as caught:
        labeler.label({"L0H0": ["a"]})
    assert KEY not in str(caught.value) and KEY not in repr(labeler)
    server.reply = lambda body: (401, f"bad key {KEY}".encode(), 0)  # a server echoing the key
    with pytest.raises(LabelerError, match=r"HTTP 401 Unauthorized: bad key \*\*\*") as caught:
        llm(server).fits(["a"], "colour")
    assert KEY not in str(caught.value)


def test_llm_configuration_from_environment(server, monkeypatch):
    for name in ("CLIP_LENS_LLM_URL", "CLIP_LENS_LLM_MODEL", "CLIP_LENS_LLM_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LabelerError, match="needs an endpoint URL .*CLIP_LENS_LLM_URL.* and a model name .*CLIP_LENS_LLM_MODEL"):
        LLMLabeler()
    with pytest.raises(LabelerError, match="labeler='prototype'"):
        HeadLabels(labeler="llm", url=server.url)
    monkeypatch.setenv("CLIP_LENS_LLM_URL", server.url + "/")
    monkeypatch.setenv("CLIP_LENS_LLM_MODEL", "env-model")
    monkeypatch.setenv("CLIP_LENS_LLM_KEY", "sk-env")
    server.reply = lambda body: chat('{"fits": [false]}')
    assert LLMLabeler().fits(["a dog"], "colour") == [False]
    request = server.requests[0]
    assert (request["path"], request["body"]["model"], request["headers"]["Authorization"]) == (
        "/v1/chat/completions", "env-model", "Bearer sk-env")


def test_llm_custom_examples():
    examples = [{"texts": ["a red car"], "label": "colour", "fits": [True]}]
    labeler = LLMLabeler(url="http://127.0.0.1:9/v1", model="m", examples=examples)
    assert labeler.examples == examples
    assert [m["role"] for m in labeler.messages(["a dog"])] == ["system", "user", "assistant", "user"]
    with pytest.raises(InputError, match="example 0 must be"):
        LLMLabeler(url="http://127.0.0.1:9/v1", model="m", examples=[{"texts": ["a"], "label": "colour", "fits": []}])


# --- analysis, result, registry ----------------------------------------------------------------
def test_run_reads_texts_by_head_and_checks_input():
    class Spans:
        def texts_by_head(self):
            return {"L10H2": ["red"], "L2H11": ["dog", "cat"]}

    labels = HeadLabels(labeler=PrototypeLabeler(BagOfWords(), PROTOTYPES))
    result = labels.run(Spans(), model_name="fake")
    assert [(h.head, h.label) for h in result.heads] == [("L2H11", "animal"), ("L10H2", "colour")]  # sorted by (layer, head)
    with pytest.raises(InputError, match="model_name"):
        labels.run(Spans())
    for bad, message in [({}, "no heads"), ({"layer3": ["a"]}, "L<layer>H<head>"), ({"L0H0": "red"}, "list of strings"), ([], "got list")]:
        with pytest.raises(InputError, match=message):
            labels.run(bad, model_name="fake")
    with pytest.raises(InputError, match="labeler must be one of prototype, llm"):
        HeadLabels(labeler="gpt")
    with pytest.raises(InputError, match="pass HeadLabels\\(model"):
        HeadLabels()


def test_result_round_trip_and_plot(tmp_path):
    result = HeadLabels(labeler=PrototypeLabeler(BagOfWords(), PROTOTYPES)).run(TestPrototypeLabeler.SPANS, model_name="fake")
    path = result.save(tmp_path)
    assert path == tmp_path / "HeadLabelsResult.json"
    assert HeadLabelsResult.load(path) == result
    fig = result.plot()
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["0.33", "0.50", "0.50", "0.75"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["colour", "shape", "animal", "none"]
    assert ax.images[0].get_array().shape == (2, 2, 4)  # layers 0-1 × heads 0-1


def test_registry():
    assert clip_lens.analyses.get("head_labels") is HeadLabels
    assert isinstance(HeadLabels, clip_lens.analyses.Analysis) and HeadLabels.needs == ("spans",)
    assert set(HeadLabels.parameters) >= {"labeler", "prototypes", "min_confidence", "url", "llm_model", "model_name"}
