"""The ``textspan`` analysis: TEXTSPAN for every head of a collected store."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from clip_lens.results import JSONResult
from clip_lens.banks import TextBank, encode_bank, load_bank
from clip_lens.collect import Store
from clip_lens.errors import InputError
from clip_lens_plugins.textspan.algorithm import Span, textspan

if TYPE_CHECKING:
    from clip_lens import HookedCLIP


def _skipped_note(store: Store) -> str:
    """Why a store holds fewer rows than its source had images, for a label-count error ("" when it skipped none)."""
    skipped = len(store.skipped())
    if not skipped:
        return ""
    return (f" ({store.n_images} source images, {skipped} skipped when collected because they could not be decoded; "
            "give one label per row of store.ids())")


@dataclass
class HeadSpan:
    """The span of one head."""

    head: str
    layer: int
    index: int
    texts: list[str]
    text_indices: list[int]
    explained_variance: list[float]
    """Share of the head's output variance each text removes, in order."""
    cumulative: list[float]
    total_variance: float
    """Variance of the head's (normalised) outputs over the images: how much the head varies at all."""


@dataclass
class TextSpanResult(JSONResult):
    """TEXTSPAN of a set of heads over a collected store."""

    model: str
    bank: str
    m: int
    n_images: int
    heads: list[HeadSpan]
    spans: dict[str, Span] = field(default_factory=dict, repr=False)
    """Per head: the tensors (basis, mean) for [`reconstruct`][clip_lens_plugins.textspan.TextSpanResult.reconstruct]; not saved in JSON."""

    def to_dict(self) -> dict:
        return {"model": self.model, "bank": self.bank, "m": self.m, "n_images": self.n_images,
                "heads": [asdict(h) for h in self.heads]}

    @classmethod
    def from_dict(cls, data: dict) -> "TextSpanResult":
        """The result `save` wrote (without the span tensors, which are not saved: `reconstruct`
        needs the result `TextSpan.run` returned)."""
        try:
            heads = [HeadSpan(**h) for h in data["heads"]]
            return cls(model=data["model"], bank=data["bank"], m=int(data["m"]), n_images=int(data["n_images"]), heads=heads)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"not a TextSpan result ({exc!r}); expected the JSON written by TextSpanResult.save.") from exc

    def texts_by_head(self) -> dict[str, list[str]]:
        return {h.head: h.texts for h in self.heads}

    def by_head(self) -> dict[str, HeadSpan]:
        return {h.head: h for h in self.heads}

    def reconstruct(self, head: str, outputs: Float[Tensor, "n d"], m: Optional[int] = None) -> Float[Tensor, "n d"]:
        """``outputs`` of ``head`` projected on the span of its first ``m`` texts."""
        if head not in self.spans:
            raise InputError(f"no span tensors for {head}; they exist only on the result TextSpan.run returned.")
        return self.spans[head].reconstruct(outputs, m)

    @torch.no_grad()
    def replacement_accuracy(
        self,
        store: Store,
        tasks: Mapping[str, tuple[Float[Tensor, "classes d"], Sequence[int]]],
        ms: Sequence[int] = (5, 10, 20),
    ) -> dict[str, dict[str, float]]:
        """Zero-shot accuracy when every analysed head's output is replaced by its span
        reconstruction (first ``m`` texts), against the original: the paper's check that the
        spans keep what the heads contribute. Heads not analysed are left as they are.

        ``tasks``: name → (class text embeddings, true class of every store image). Returns
        ``{task: {"original": acc, "m=5": acc, ..., "ci95": {"original": [low, high], ...}}}`` (bootstrap
        95% intervals over the images); an ``m`` above the spans' ``m`` is skipped.
        """
        from clip_lens.stats import bootstrap_ci

        embedding, heads = store.read("embedding"), store.read("heads")
        tasks = {name: (classifier, torch.as_tensor(list(labels))) for name, (classifier, labels) in tasks.items()}
        for name, (_, labels) in tasks.items():
            if len(labels) != len(embedding):
                raise InputError(f"task '{name}': {len(labels)} labels for {len(embedding)} images in the store"
                                 f"{_skipped_note(store)}.")

        scores: dict = {name: {"ci95": {}} for name in tasks}

        def score(name: str, column: str, image: Tensor) -> None:
            classifier, labels = tasks[name]
            logits = torch.nn.functional.normalize(image, dim=-1) @ classifier.T
            correct = (logits.argmax(-1) == labels).float().numpy()
            scores[name][column] = float(correct.mean())
            scores[name]["ci95"][column] = list(bootstrap_ci(correct))

        for name in tasks:
            score(name, "original", embedding)
        for m in ms:
            if m > self.m:
                continue
            replaced = embedding.clone()  # one reconstruction per m, shared by every task
            for head in self.heads:
                outputs = heads[:, store.head_layers.index(head.layer), head.index]
                replaced += self.reconstruct(head.head, outputs, m) - outputs
            for name in tasks:
                score(name, f"m={m}", replaced)
        return scores

    def plot(self):
        """Cumulative explained variance per head (one curve per head, grouped by layer)."""
        from matplotlib.figure import Figure

        layers = sorted({h.layer for h in self.heads})
        fig = Figure(figsize=(3.2 * len(layers), 3.0), layout="constrained")
        axes = fig.subplots(1, len(layers), sharey=True, squeeze=False)[0]
        for ax, layer in zip(axes, layers):
            for h in (h for h in self.heads if h.layer == layer):
                ax.plot(range(1, len(h.cumulative) + 1), h.cumulative, marker=".", label=f"H{h.index}")
            ax.set_title(f"layer {layer}")
            ax.set_xlabel("texts in span")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("variance explained (cumulative)")
        return fig


class TextSpan:
    """TEXTSPAN (Gandelsman et al., ICLR 2024) on every selected head of a collected store.

    >>> store = clip_lens.collect(model, images, "store")                                  # doctest: +SKIP
    >>> spans = TextSpan(model).run(store, bank="general", m=10)                            # doctest: +SKIP
    >>> spans.by_head()["L11H3"].texts[:3]                                                  # doctest: +SKIP
    """

    name = "textspan"
    description = "For each head, the texts whose directions span its outputs (greedy variance, TEXTSPAN)."
    parameters = {
        "bank": "text bank: 'general', 'shapes', a text file path, a list of texts or a TextBank",
        "m": "texts per head (default 10)",
        "layers": "layers to analyse (default: the last 4 collected per head)",
        "rank": "project texts on the top-rank singular directions of each head's outputs (default: their numerical rank)",
        "progress": "tqdm bars on stderr while the bank is encoded and the layers are spanned (default False)",
    }
    needs = ("model", "store", "text_bank")

    def __init__(self, model: "HookedCLIP"):
        self.model = model

    def run(
        self,
        store: Union[Store, str],
        bank: Union[str, Sequence[str], TextBank] = "general",
        m: int = 10,
        layers: Optional[Sequence[int]] = None,
        rank: Optional[int] = None,
        progress: bool = False,
    ) -> TextSpanResult:
        store = store if isinstance(store, Store) else Store.open(store)
        store.check_model(self.model, self.model.pretrained)
        bank = bank if isinstance(bank, TextBank) else load_bank(bank)
        if not store.head_layers:
            raise InputError("the store has no per-head terms; collect it with heads='all' or a list of layers.")
        layers = list(layers) if layers is not None else store.head_layers[-4:]
        missing = [layer for layer in layers if layer not in store.head_layers]
        if missing:
            raise InputError(f"layers {missing} were not collected per head; the store has {store.head_layers}.")
        from tqdm.auto import tqdm

        with tqdm(total=len(bank), desc=f"textspan: encode {bank.name}", unit="text", disable=not progress, leave=False) as bar:
            texts = encode_bank(_Counting(self.model, bar), bank)
        heads = store.read("heads")  # [N, head_layer, head, D]
        result = TextSpanResult(self.model.model_name, bank.name, m, len(heads), [])  # the rows read: skipped images left out
        for layer in tqdm(layers, desc="textspan: layers", unit="layer", disable=not progress, leave=False):
            outputs = heads[:, store.head_layers.index(layer)].transpose(0, 1)  # [head, N, D]
            span = textspan(outputs, texts, m, rank)
            for h in range(outputs.shape[0]):
                key = f"L{layer}H{h}"
                one = span.head(h)
                result.spans[key] = one
                result.heads.append(HeadSpan(
                    head=key, layer=layer, index=h, texts=[bank.texts[i] for i in one.indices.tolist()],
                    text_indices=one.indices.tolist(), explained_variance=one.explained_variance.tolist(),
                    cumulative=one.cumulative.tolist(), total_variance=float(one.total_variance),
                ))
        return result


class _Counting:
    """A model whose ``encode_text`` advances a tqdm bar by the texts it encodes (for `encode_bank`)."""

    def __init__(self, model: "HookedCLIP", bar: Any):
        self._model, self._bar = model, bar

    def to_tokens(self, texts: Sequence[str]) -> Any:
        return self._model.to_tokens(texts)

    def encode_text(self, tokens: Tensor, **options: Any) -> Tensor:
        encoded = self._model.encode_text(tokens, **options)
        self._bar.update(len(tokens))
        return encoded
