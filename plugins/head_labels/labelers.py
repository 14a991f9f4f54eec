"""Head labelers: each head's TextSpan texts → a property label, and a judge of texts against a label.

Both labelers implement `Labeler`:

* `PrototypeLabeler` (offline default): a text's property is the nearest set of prototype
  phrases in the model's text-embedding space (``prototypes_general.json`` for real CLIP models,
  `shapes_prototypes` for the bundled ``toy-shapes`` models). On the shapes world it can abstain: a
  text fits no property when it is not clearly nearer to its property than to phrases about
  nothing in the world (``none`` phrases: held-out unrelated texts), by a threshold calibrated on held-out ground truth
  (`calibrate`, `world_texts`);
* `LLMLabeler`: in-context labelling by a chat model behind any OpenAI-compatible endpoint,
  with the few-shot prompt of ``prompt.md`` (standard-library HTTP, no extra dependency).
"""

from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch
import torch.nn.functional as F

from clip_lens.errors import ClipLensError, InputError, close_matches
from clip_lens.toy.texts import DESCRIPTORS, DISTRACTORS
from clip_lens.toy.evaluate import shapes_world_version
from clip_lens.toy.world import WORLD_VERSIONS, ShapesWorld, attribute_prompt, phrase
from clip_lens_plugins.head_labels.result import ABSTAIN, HeadLabel

Encoder = Callable[[list[str]], torch.Tensor]
"""``n`` texts → ``[n, d]`` text embeddings."""


ENV_URL, ENV_MODEL, ENV_KEY = "CLIP_LENS_LLM_URL", "CLIP_LENS_LLM_MODEL", "CLIP_LENS_LLM_KEY"


class LabelerError(ClipLensError, RuntimeError):
    """A labeler could not label: LLM endpoint unconfigured, unreachable, or answering badly."""


@runtime_checkable
class Labeler(Protocol):
    """What [`HeadLabels`][clip_lens_plugins.head_labels.HeadLabels] and the metrics use."""

    name: str
    """Recorded as `HeadLabelsResult.labeler`: ``"prototype"`` or ``"llm:<model name>"``."""
    properties: list[str]
    """The labels it chooses from (empty: any label)."""

    def label(self, spans: dict[str, list[str]]) -> list[HeadLabel]:
        """One label per head of ``spans`` (head key → texts in TextSpan order), in the same order."""

    def fits(self, texts: list[str], label: Optional[str]) -> list[bool]:
        """``fits[i]``: ``texts[i]`` expresses property ``label`` (the judge behind the metrics; None fits nothing)."""
        ...


# --- prototype sets ----------------------------------------------------------------------------
def general_prototypes() -> dict[str, list[str]]:
    """Property → short phrases, for real CLIP models (``prototypes_general.json``)."""
    return json.loads(resources.files(__package__).joinpath("prototypes_general.json").read_text())


def model_world_version(model_name: Optional[str]) -> int:
    """The shapes-world version a bundled model was trained on (its registry entry; 1 for other models)."""
    return shapes_world_version(model_name or "") or 1


def _world(version: int) -> ShapesWorld:
    if version not in WORLD_VERSIONS:
        raise InputError(f"world_version must be one of {WORLD_VERSIONS}, got {version!r}.")
    return ShapesWorld(seed=0, version=version)


def shapes_prototypes(version: int = 1) -> dict[str, list[str]]:
    """Property → the shapes world's single-attribute prompts of its values ("a red shape", "a shape
    at the top left"), one property per world attribute (version 2 adds ``count``), so every word is in
    the toy model's vocabulary. The property names are the attribute names, in every table."""
    world = _world(version)
    return {attr: [attribute_prompt(attr, value) for value in world.values[attr]] for attr in world.attributes}


PROTOTYPE_SETS: dict[str, Callable[[], dict[str, list[str]]]] = {"general": general_prototypes, "shapes": shapes_prototypes}


def resolve_prototypes(
    prototypes: Union[str, Mapping[str, Sequence[str]]], model_name: Optional[str] = None, version: Optional[int] = None,
) -> dict[str, list[str]]:
    """A prototype set: a mapping as given, a name of `PROTOTYPE_SETS`, or ``"auto"`` (``"shapes"``
    for the bundled toy models, else ``"general"``). ``version``: the shapes world's (default: the
    model's, `model_world_version`)."""
    if not isinstance(prototypes, str):
        return {prop: list(phrases) for prop, phrases in prototypes.items()}
    name = ("shapes" if is_toy(model_name) else "general") if prototypes == "auto" else prototypes
    if name not in PROTOTYPE_SETS:
        raise InputError(
            f"unknown prototype set '{name}'.{close_matches(name, PROTOTYPE_SETS)} Choose 'auto', "
            f"{', '.join(repr(n) for n in PROTOTYPE_SETS)}, or pass a dict property → phrases."
        )
    if name == "shapes":
        return shapes_prototypes(version or model_world_version(model_name))
    return PROTOTYPE_SETS[name]()


def is_toy(model_name: Optional[str]) -> bool:
    """A bundled shapes-world model (``toy-shapes``, its checkpoints, ``toy-shapes-v2``)."""
    return shapes_world_version(model_name or "") is not None


# --- ground truth of the shapes world's texts --------------------------------------------------
def world_texts(version: int = 1) -> dict[str, frozenset[str]]:
    """Every shapes-world text whose attributes are known by construction → the attributes it names.

    The single-attribute prompts (``attribute_prompt``); the pairs of object attributes and the
    colour + shape + background texts of ``text_bank``; the ``"something with …"`` descriptors and the
    distractors name none (empty set). Descriptors count as naming no attribute: they describe a shape
    by its parts ("four corners") without naming a value of any attribute, and the bundled models were
    never trained on their words, so nothing in the model ties them to shape.
    """
    world = _world(version)
    values = world.values
    truth = {attribute_prompt(a, v): frozenset({a}) for a in world.attributes for v in values[a]}
    objects = [a for a in ("size", "colour", "shape", "position") if a in world.attributes]
    for a, b in itertools.combinations(objects, 2):
        for va, vb in itertools.product(values[a], values[b]):
            truth.setdefault(phrase([{a: va, b: vb}]), frozenset({a, b}))
    for colour, shape, background in itertools.product(values["colour"], values["shape"], values["background"]):
        truth.setdefault(phrase([{"colour": colour, "shape": shape}], background), frozenset({"colour", "shape", "background"}))
    for text in [*(f"something with {d}" for d in itertools.chain(*DESCRIPTORS.values())), *DISTRACTORS]:
        truth.setdefault(text, frozenset())
    return truth


def calibration_half(text: str) -> bool:
    """Whether ``text`` belongs to the calibration half (else the evaluation half): the parity of its
    SHA-256, so a text's half never depends on which other texts are split."""
    return hashlib.sha256(text.encode()).digest()[-1] % 2 == 0


@dataclass(frozen=True)
class Calibration:
    """The abstention of a `PrototypeLabeler`, chosen on the calibration half of `world_texts`."""

    threshold: float
    """A text (that uses a world word, when the labeler has ``words``) fits its nearest property only
    when its similarity to it exceeds its similarity to the nearest ``none`` phrase by more than this.
    Chosen to maximise Youden's J on the calibration half:
    (share of texts naming attributes that fit one they name) − (share of unrelated texts that fit
    anything), each unrelated text scored without itself among the ``none`` phrases; ties: the larger."""
    none: list[str]
    """The abstain class: the calibration half's texts that name no attribute."""
    texts: list[str]
    """The calibration texts it was chosen on."""


def world_words(version: int = 1) -> dict[str, frozenset[str]]:
    """Attribute → the words of its values ("red", "circle", "top", "striped", "two" …): a text can
    only say something about an attribute with one of them (`PrototypeLabeler` ``words``)."""
    world = _world(version)
    return {a: frozenset(w for value in values for w in value.split()) for a, values in world.values.items()}


def _allowed(texts: Sequence[str], properties: Sequence[str], words: Optional[Mapping[str, frozenset[str]]]) -> torch.Tensor:
    """``bool [n_texts, n_properties]``: the text uses a word of the property (all True without ``words``)."""
    if words is None:
        return torch.ones(len(texts), len(properties), dtype=torch.bool)
    used = [set(re.findall(r"[a-z]+", t.lower())) for t in texts]
    return torch.tensor([[bool(u & words.get(p, frozenset())) for p in properties] for u in used], dtype=torch.bool).reshape(len(texts), len(properties))


def calibrate(
    encode: Encoder, prototypes: Mapping[str, Sequence[str]], truth: Mapping[str, frozenset],
    words: Optional[Mapping[str, frozenset[str]]] = None,
) -> Calibration:
    """Choose the abstain class and threshold from the calibration half of ``truth`` (text → attributes
    it names; empty: about nothing in the world) only; the evaluation half is never read.

    Raises:
        InputError: the calibration half lacks texts naming an attribute or texts naming none.
    """
    texts = [t for t in truth if calibration_half(t)]
    related = torch.tensor([bool(truth[t]) for t in texts])
    if related.all() or not related.any():
        raise InputError("calibration needs texts that name an attribute and texts that name none in its calibration half.")
    none = [t for t in texts if not truth[t]]
    per_property, none_sim = PrototypeLabeler(encode, prototypes, none=none).scores(texts, leave_out=True)
    allowed = _allowed(texts, list(prototypes), words)
    best, index = per_property.masked_fill(~allowed, float("-inf")).max(1)
    margin = best - none_sim  # [n_texts]
    names = list(prototypes)
    right = torch.tensor([names[i] in truth[t] for t, i in zip(texts, index.tolist())])
    gate = allowed.any(1)

    def youden(tau: float) -> float:
        fit = (margin > tau) & gate
        return float((fit & right)[related].float().mean() - fit[~related].float().mean())

    candidates = sorted(set(margin.tolist()), reverse=True)  # max keeps the first: the larger of equals
    return Calibration(max(candidates, key=youden), none, texts)


# --- prototype labeler -------------------------------------------------------------------------
class PrototypeLabeler:
    """Labels heads by nearest prototype property in a text-embedding space (offline, deterministic).

    A text's property is the one whose prototype phrases come closest (cosine similarity, max over
    the property's phrases; ties go to the property listed first). With ``none`` phrases (texts about
    no property) a text fits its property only when ``sim(property) − sim(nearest none phrase) >
    threshold``; otherwise it is *unrelated* and fits nothing. With ``words`` (property → its words; the
    shapes world's value words, `world_words`) a text can only fit a property whose words it uses: the
    toy text tower never saw "an old book" in training, so where it puts it says nothing.

    A head's label is the property most of its texts fit (ties: the one reached first in TextSpan
    order), its confidence the share of texts that fit it. The labeler abstains (label None, shown as
    ``"none"``) when more than half of the texts fit no property (``abstention="none"``) or when the
    label's share is below ``min_confidence`` (``abstention="mixed"``).

    Args:
        encode: ``n`` texts → ``[n, d]`` embeddings (re-normalised here, so any scale works).
        prototypes: property → short phrases describing it.
        min_confidence: the smallest share of fitting texts that still gives a label (0..1).
        none: phrases about no property (the abstain class); empty: every text fits its nearest property.
        threshold: the margin over the ``none`` phrases a text needs to fit (see `calibrate`).
        words: property → words; a text fits only a property whose words it uses (None: no such rule).
    """

    name = "prototype"

    def __init__(
        self, encode: Encoder, prototypes: Mapping[str, Sequence[str]], min_confidence: float = 0.4,
        none: Sequence[str] = (), threshold: float = 0.0, words: Optional[Mapping[str, frozenset[str]]] = None,
    ):
        if not prototypes or any(not phrases or not all(isinstance(p, str) and p.strip() for p in phrases) for phrases in prototypes.values()):
            raise InputError("prototypes must map each property to a non-empty list of non-empty phrases.")
        if not 0.0 <= min_confidence <= 1.0:
            raise InputError(f"min_confidence is a share of texts in [0, 1], got {min_confidence}.")
        if ABSTAIN in prototypes:
            raise InputError(f"'{ABSTAIN}' names the abstention; give its phrases as none=, not as a property.")
        if not all(isinstance(p, str) and p.strip() for p in none):
            raise InputError("none phrases must be non-empty strings.")
        self.encode = encode
        self.prototypes = {prop: list(phrases) for prop, phrases in prototypes.items()}
        self.properties = list(self.prototypes)
        self.min_confidence = min_confidence
        self.none = list(none)
        self.threshold = float(threshold)
        self.words = words
        self._phrases = [p for phrases in self.prototypes.values() for p in phrases]
        self._owner = torch.tensor([i for i, phrases in enumerate(self.prototypes.values()) for _ in phrases])
        """``[n_phrases]``: the property index of each phrase."""
        self._phrase_embeddings: Optional[torch.Tensor] = None  # embedded on first use, once
        self._none_embeddings: Optional[torch.Tensor] = None

    @classmethod
    def from_model(
        cls, model: Any, prototypes: Union[str, Mapping[str, Sequence[str]]] = "auto",
        min_confidence: float = 0.4, batch_size: int = 256, world_version: Optional[int] = None,
    ) -> "PrototypeLabeler":
        """A labeler embedding with a [`HookedCLIP`][clip_lens.HookedCLIP]'s text tower (``batch_size`` texts a pass).

        With the shapes prototype set (``"auto"`` for the bundled toy models), it abstains with the
        `calibrate`d ``none`` phrases and threshold of the world of ``world_version`` (default: the
        model's, `model_world_version`); other sets never abstain on a text."""

        @torch.no_grad()
        def encode(texts: list[str]) -> torch.Tensor:
            chunks = [texts[i : i + batch_size] for i in range(0, len(texts), batch_size)]
            return torch.cat([model.encode_text(model.to_tokens(chunk), normalize=True).float().cpu() for chunk in chunks])

        model_name = getattr(model, "model_name", None)
        version = world_version or model_world_version(model_name)
        phrases = resolve_prototypes(prototypes, model_name, version)
        if phrases != shapes_prototypes(version):
            return cls(encode, phrases, min_confidence)
        words = world_words(version)
        calibration = calibrate(encode, phrases, world_texts(version), words)
        return cls(encode, phrases, min_confidence, none=calibration.none, threshold=calibration.threshold, words=words)

    def _embed(self, texts: list[str]) -> torch.Tensor:
        """``[n, d]`` unit-norm embeddings."""
        out = self.encode(texts)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(texts):
            found = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"encode must return a [{len(texts)}, d] tensor for {len(texts)} texts, got {found}.")
        return F.normalize(out.detach().float().cpu(), dim=-1)

    def scores(self, texts: Sequence[str], leave_out: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n, n_properties]`` similarity of each text to each property (max over its phrases) and
        ``[n]`` to the nearest ``none`` phrase (−inf without any). ``leave_out``: a text that is itself a
        ``none`` phrase is scored without it (calibration on the abstain class's own phrases)."""
        if self._phrase_embeddings is None:
            self._phrase_embeddings = self._embed(self._phrases)
            self._none_embeddings = self._embed(self.none) if self.none else torch.empty(0, self._phrase_embeddings.shape[1])
        embedded = self._embed(list(texts))
        similarity = embedded @ self._phrase_embeddings.T  # [n, n_phrases]
        per_property = torch.stack([similarity[:, self._owner == i].amax(1) for i in range(len(self.properties))], 1)
        to_none = embedded @ self._none_embeddings.T  # [n, n_none]
        if leave_out:
            itself = torch.tensor([[t == p for p in self.none] for t in texts], dtype=torch.bool).reshape(len(texts), len(self.none))
            to_none = to_none.masked_fill(itself, float("-inf"))
        none = to_none.amax(1) if self.none else torch.full((len(texts),), float("-inf"))
        return per_property, none

    def nearest(self, texts: Sequence[str]) -> list[Optional[str]]:
        """Each text's property, None where it fits none (each distinct text is embedded once)."""
        distinct = list(dict.fromkeys(texts))
        if not distinct:
            return []
        per_property, none = self.scores(distinct)
        allowed = _allowed(distinct, self.properties, self.words)
        best, index = per_property.masked_fill(~allowed, float("-inf")).max(1)
        fits = ((best - none) > self.threshold) & allowed.any(1)
        by_text = {t: self.properties[i] if ok else None for t, i, ok in zip(distinct, index.tolist(), fits.tolist())}
        return [by_text[t] for t in texts]

    def label(self, spans: dict[str, list[str]]) -> list[HeadLabel]:
        every_text = list(dict.fromkeys(t for texts in spans.values() for t in texts))
        nearest = dict(zip(every_text, self.nearest(every_text)))  # one batch: heads share many texts
        heads = []
        for head, texts in spans.items():
            properties = [nearest[t] for t in texts]
            counts = Counter(p for p in properties if p is not None)  # insertion order = TextSpan order; max keeps the first
            label = max(counts, key=counts.__getitem__) if counts else None
            confidence = counts[label] / len(texts) if label is not None else 0.0
            abstention = None
            if 2 * properties.count(None) > len(texts) or label is None:
                abstention = ABSTAIN
            elif confidence < self.min_confidence:
                abstention = "mixed"
            if abstention is not None:
                label = None
            heads.append(HeadLabel(head, label, confidence, list(texts), [p is not None and p == label for p in properties], abstention))
        return heads

    def fits(self, texts: list[str], label: Optional[str]) -> list[bool]:
        if label is None:
            return [False] * len(texts)
        if label not in self.properties:
            raise InputError(
                f"'{label}' is not a property of this labeler.{close_matches(label, self.properties)} "
                f"Properties: {', '.join(self.properties)}."
            )
        return [p == label for p in self.nearest(texts)]


# --- LLM labeler -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Prompt:
    """The parts of ``prompt.md``."""

    system: str
    examples: list[dict]
    """``[{"texts": [...], "label": str | None, "fits": [...]}]``."""
    judge: str


def load_prompt() -> Prompt:
    """Read ``prompt.md``: ``## System``, ``## Example…`` (a JSON block each) and ``## Judge`` sections."""
    text = resources.files(__package__).joinpath("prompt.md").read_text()
    sections = {}
    examples = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:  # what precedes the first heading is for readers
        title, _, body = section.partition("\n")
        if title.startswith("Example"):
            examples.append(json.loads(re.search(r"```json\s*(.*?)```", body, re.S).group(1)))
        else:
            sections[title.strip()] = body.strip()
    return Prompt(sections["System"], examples, sections["Judge"])


def check_examples(examples: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Worked examples as plain dicts, or [`InputError`][clip_lens.InputError] naming the first bad one."""
    checked = []
    for i, example in enumerate(examples):
        texts, label, fits = example.get("texts"), example.get("label"), example.get("fits")
        if (
            not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts)
            or not (label is None or isinstance(label, str))
            or not isinstance(fits, list) or len(fits) != len(texts) or not all(isinstance(f, bool) for f in fits)
        ):
            raise InputError(
                f"example {i} must be {{'texts': [str, ...], 'label': str or None, 'fits': [bool per text]}}, got {dict(example)!r}."
            )
        checked.append({"texts": list(texts), "label": label, "fits": list(fits)})
    return checked


def render_texts(texts: Sequence[str]) -> str:
    """The numbered text list of a user message (numbers help the model give one flag per text)."""
    return "Texts:\n" + "\n".join(f"{i}. {t}" for i, t in enumerate(texts, 1))


FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)  # models often wrap JSON in a code fence


class LLMLabeler:
    """In-context labelling by a chat model behind any OpenAI-compatible endpoint.

    One request per head: the system message and worked examples of ``prompt.md``, then the head's
    numbered texts; the model answers ``{"label": ..., "fits": [...]}``, so labelling and judging
    take one call. ``confidence`` is the share of texts that fit. `fits` asks the judge prompt.

    Args:
        url: API base such as ``http://localhost:8000/v1`` (requests go to ``{url}/chat/completions``);
            default ``$CLIP_LENS_LLM_URL``.
        model: chat model name; default ``$CLIP_LENS_LLM_MODEL``.
        api_key: sent as ``Authorization: Bearer <key>``; default ``$CLIP_LENS_LLM_KEY`` (unset: no
            header, for local servers). Never shown in messages or ``repr``.
        timeout: seconds per request.
        examples: worked examples ``[{"texts": [...], "label": str | None, "fits": [...]}]``;
            default those of ``prompt.md``. With ``properties``, only those whose label is allowed
            (or null) are sent.
        properties: the allowed labels (the model picks one or null); default: any label.

    Raises:
        LabelerError: no URL or model configured; later, any failed or malformed exchange.
    """

    def __init__(
        self, url: Optional[str] = None, model: Optional[str] = None, api_key: Optional[str] = None,
        timeout: float = 30, examples: Optional[Sequence[Mapping[str, Any]]] = None,
        properties: Optional[Sequence[str]] = None,
    ):
        url = url or os.environ.get(ENV_URL)
        model = model or os.environ.get(ENV_MODEL)
        if not url or not model:
            missing = " and ".join(f"{what} (pass {arg}= or set {env})" for what, arg, env, value in (
                ("an endpoint URL", "url", ENV_URL, url), ("a model name", "model", ENV_MODEL, model)) if not value)
            raise LabelerError(
                f"the LLM labeler needs {missing}, e.g. {ENV_URL}=http://localhost:8000/v1. "
                "Without an LLM, use labeler='prototype'."
            )
        self.url = url.rstrip("/")
        self.model = model
        self._api_key = api_key or os.environ.get(ENV_KEY)
        self.timeout = timeout
        self.properties = list(properties or [])
        self.name = f"llm:{model}"
        prompt = load_prompt()
        self.examples = check_examples(prompt.examples if examples is None else examples)
        self._judge_system = prompt.judge
        allowed = f"\n\nAllowed labels: {', '.join(self.properties)}, or null. Use these names exactly." if self.properties else ""
        self._few_shot = [{"role": "system", "content": prompt.system + allowed}]
        for example in self.examples:
            if self.properties and example["label"] not in (None, *self.properties):
                continue  # an example must never show a label the model may not use
            self._few_shot += [
                {"role": "user", "content": render_texts(example["texts"])},
                {"role": "assistant", "content": json.dumps({"label": example["label"], "fits": example["fits"]})},
            ]

    def __repr__(self) -> str:
        return f"LLMLabeler(url={self.url!r}, model={self.model!r}, api_key={'set' if self._api_key else 'unset'})"

    def messages(self, texts: Sequence[str]) -> list[dict]:
        """The chat messages of one head's request: system, worked examples, the head's texts."""
        return [*self._few_shot, {"role": "user", "content": render_texts(texts)}]

    def label(self, spans: dict[str, list[str]]) -> list[HeadLabel]:
        return [self._label_head(head, list(texts)) for head, texts in spans.items()]

    def _label_head(self, head: str, texts: list[str]) -> HeadLabel:
        if not texts:
            return HeadLabel(head, None, 0.0, [], [], ABSTAIN)
        where = f"LLM labeler, head {head}"
        answer = self._ask(self.messages(texts), where, {"label", "fits"})
        label = answer["label"]
        if not (label is None or (isinstance(label, str) and label.strip())):
            raise self._error(f"{where}: the label must be a property name or null, got {label!r}.")
        label = label.strip() if label is not None else None
        if label is not None and self.properties and label not in self.properties:
            raise self._error(
                f"{where}: the model answered label '{label}', which is not one of the allowed properties "
                f"({', '.join(self.properties)}).{close_matches(label, self.properties)} Use a stronger model or "
                "extend properties=."
            )
        fits = self._check_fits(answer["fits"], len(texts), where)
        if label is None:
            fits = [False] * len(texts)  # no property: nothing fits it, whatever the flags said
        return HeadLabel(head, label, sum(fits) / len(texts), texts, fits, ABSTAIN if label is None else None)

    def fits(self, texts: list[str], label: Optional[str]) -> list[bool]:
        if label is None or not texts:
            return [False] * len(texts)
        where = f"LLM judge, label '{label}'"
        messages = [
            {"role": "system", "content": self._judge_system},
            {"role": "user", "content": f"Property: {label}\n{render_texts(texts)}"},
        ]
        return self._check_fits(self._ask(messages, where, {"fits"})["fits"], len(texts), where)

    # --- one exchange ---------------------------------------------------------------------------
    def _error(self, message: str) -> LabelerError:
        if self._api_key:  # a server may echo the request back: the key must never reach a message
            message = message.replace(self._api_key, "***")
        return LabelerError(message)

    def _check_fits(self, fits: Any, n_texts: int, where: str) -> list[bool]:
        if not isinstance(fits, list) or len(fits) != n_texts or not all(isinstance(f, bool) for f in fits):
            raise self._error(f"{where}: 'fits' must be {n_texts} true/false values, one per text; got {fits!r}.")
        return fits

    def _ask(self, messages: list[dict], where: str, keys: set[str]) -> dict:
        """POST the chat and return the model's answer: a JSON object with exactly ``keys``."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        endpoint = f"{self.url}/chat/completions"
        request = urllib.request.Request(endpoint, data=body, headers=headers, method="POST")
        # `from None` below: the message says everything; a urllib/json traceback would only bury it
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read(300).decode(errors="replace").strip()
            except OSError:
                detail = ""
            raise self._error(
                f"{where}: {endpoint} answered HTTP {exc.code} {exc.reason}{f': {detail}' if detail else ''}. "
                f"Check the URL, model name and API key ({ENV_URL}, {ENV_MODEL}, {ENV_KEY})."
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            if isinstance(reason, TimeoutError):
                message = f"no answer from {endpoint} within {self.timeout} s; raise timeout= or check the server"
            else:
                message = f"cannot reach {endpoint} ({reason}); check {ENV_URL} and that the server runs"
            raise self._error(f"{where}: {message}.") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except json.JSONDecodeError:
            raise self._error(
                f"{where}: {endpoint} did not answer JSON (got {raw[:80]!r}); {ENV_URL} must be the API base "
                "of an OpenAI-compatible server, e.g. http://localhost:8000/v1."
            ) from None
        except (KeyError, IndexError, TypeError):
            raise self._error(f"{where}: {endpoint} did not answer a chat completion (no choices[0].message.content): {raw[:200]!r}.") from None
        return self._parse_answer(content, where, keys)

    def _parse_answer(self, content: Any, where: str, keys: set[str]) -> dict:
        text = content.strip() if isinstance(content, str) else ""
        text = FENCE.sub(r"\1", text)
        expected = "{" + ", ".join(f'"{k}": …' for k in sorted(keys)) + "}"
        try:
            answer = json.loads(text)
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise self._error(f"{where}: the model's answer is not a JSON object {expected}: {str(content)[:200]!r}. "
                              "Use a model that follows JSON instructions, or labeler='prototype'.")
        if set(answer) != keys:
            raise self._error(f"{where}: the model's answer has keys {sorted(answer)}, expected exactly {sorted(keys)}: {text[:200]!r}.")
        return answer
