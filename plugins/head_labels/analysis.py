"""The ``head_labels`` analysis: the image property of every attention head, from its TextSpan texts."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from clip_lens.errors import InputError
from clip_lens_plugins.head_labels.labelers import Labeler, LLMLabeler, PrototypeLabeler, resolve_prototypes
from clip_lens_plugins.head_labels.result import HeadLabelsResult, parse_head

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

LABELERS = ("prototype", "llm")


class HeadLabels:
    """Label each head with the property its TextSpan texts share (colour, shape, location, …).

    >>> spans = clip_lens.analyses.get("textspan")(model).run(store, bank="shapes", m=5)  # doctest: +SKIP
    >>> labels = HeadLabels(model).run(spans)                                            # doctest: +SKIP
    >>> labels.by_head()["L3H1"].label, labels.by_head()["L3H1"].confidence              # doctest: +SKIP
    ('colour', 0.8)

    Args:
        model: the HookedCLIP the spans come from; the prototype labeler embeds with its text tower.
        labeler: ``"prototype"`` (offline, default), ``"llm"`` (OpenAI-compatible endpoint), or any
            `Labeler`.
        **options: the labeler's options (see `parameters`).
    """

    name = "head_labels"
    description = "Property label (colour, shape, location, …) of each attention head from its TextSpan texts."
    parameters = {
        "labeler": "'prototype' (offline: nearest prototype phrases in the model's text space), 'llm', or a Labeler",
        "prototypes": "prototype: 'auto' (shapes set for toy-shapes, else general), 'general', 'shapes' or a dict property → phrases",
        "min_confidence": "prototype: smallest share of a head's texts that must fit its label (else 'mixed'); default 0.4",
        "world_version": "prototype, shapes set: the world whose texts calibrate abstention; default the model's (toy-shapes-v2: 2)",
        "batch_size": "prototype: texts per text-tower pass; default 256",
        "url": "llm: API base, e.g. http://localhost:8000/v1; default $CLIP_LENS_LLM_URL",
        "llm_model": "llm: chat model name; default $CLIP_LENS_LLM_MODEL",
        "api_key": "llm: bearer key; default $CLIP_LENS_LLM_KEY (none for local servers)",
        "timeout": "llm: seconds per request; default 30",
        "examples": "llm: worked examples [{texts, label, fits}]; default those of prompt.md",
        "properties": "llm: allowed labels; default with a model: its prototype set's properties, without: any",
        "model_name": "run: the model name recorded in the result; default the model's name",
        "n_texts": "run: label from each head's first n texts (default 5; None: all)",
    }
    needs = ("spans",)

    def __init__(self, model: Optional["HookedCLIP"] = None, labeler: Union[str, Labeler] = "prototype", **options: Any):
        self.model = model
        if isinstance(labeler, Labeler):
            if options:
                raise InputError(f"options {sorted(options)} configure a labeler by name; this one is already built.")
            self.labeler = labeler
        elif labeler == "prototype":
            if model is None:
                raise InputError("the prototype labeler embeds texts with the model: pass HeadLabels(model, ...) or labeler='llm'.")
            self.labeler = PrototypeLabeler.from_model(model, **options)
        elif labeler == "llm":
            options["model"] = options.pop("llm_model", None)  # `model` names the CLIP model here
            if model is not None:  # one vocabulary for both labelers, so their tables compare
                options.setdefault("properties", list(resolve_prototypes("auto", getattr(model, "model_name", None))))
            self.labeler = LLMLabeler(**options)
        else:
            raise InputError(f"labeler must be one of {', '.join(LABELERS)} or a Labeler instance, got {labeler!r}.")

    def run(self, spans: Any, model_name: Optional[str] = None, n_texts: Optional[int] = 5) -> HeadLabelsResult:
        """Label every head of ``spans``: a dict ``"L{layer}H{head}"`` → texts (TextSpan order), or a
        TextSpan result (anything with ``texts_by_head()``). Heads come out sorted by (layer, head).

        ``n_texts``: label from each head's first texts only (default 5, as for CCS: later span texts
        explain little variance); None uses all."""
        if n_texts is not None and n_texts < 1:
            raise InputError(f"n_texts must be positive or None, got {n_texts}.")
        texts = {head: t[:n_texts] for head, t in texts_by_head(spans).items()}
        model_name = model_name or getattr(self.model, "model_name", None)
        if not model_name:
            raise InputError("pass run(..., model_name=...): the name of the model the spans come from.")
        return HeadLabelsResult(
            model=model_name, labeler=self.labeler.name, heads=self.labeler.label(texts), properties=list(self.labeler.properties),
            threshold=getattr(self.labeler, "threshold", None) if getattr(self.labeler, "none", None) else None,
        )


def texts_by_head(spans: Any) -> dict[str, list[str]]:
    """``spans`` checked and sorted by (layer, head): head key → list of texts."""
    if hasattr(spans, "texts_by_head"):
        spans = spans.texts_by_head()
    if not isinstance(spans, Mapping):
        raise InputError(f"spans must be a dict 'L<layer>H<head>' → texts or a TextSpan result, got {type(spans).__name__}.")
    if not spans:
        raise InputError("spans has no heads; run the textspan analysis first.")
    for head, texts in spans.items():
        if not isinstance(head, str):
            raise InputError(f"head keys are strings such as 'L3H1', got {head!r}.")
        parse_head(head)
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise InputError(f"head {head}: texts must be a list of strings, got {texts!r}.")
    return {head: list(spans[head]) for head in sorted(spans, key=parse_head)}
