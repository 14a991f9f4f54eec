"""Descriptor banks and the two concept sets of mutual knowledge (Sammani & Deligiannis, NeurIPS 2024).

A *descriptor* is a short text naming a visual feature of a class ("a red circle", "four legs").
The paper pools the descriptors of all classes into one deduplicated bank (D = 4,229 for ImageNet)
and describes an image twice with it:

* **visual concepts** D_v (`visual_concepts`): each of L image regions is matched to
  descriptors by Sinkhorn optimal transport, which spreads the regions over different descriptors;
  the top 3 per region, deduplicated, give at most 3·L descriptors;
* **textual concepts** D_ŷ (`textual_concepts`): the u = 50 descriptors nearest to the
  predicted class's text embedding.

Mutual knowledge is the overlap of the two sets (`information`).

Descriptor files are JSON (never pickles); see `load_descriptors` for the schema. The bundled
shapes-world bank is `shapes_world_descriptors`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from clip_lens.banks import TextBank, encode_bank
from clip_lens.errors import InputError, close_matches
from clip_lens.files import read_json

if TYPE_CHECKING:
    from clip_lens import HookedCLIP

DEFAULT_TEMPLATE = "a photo showing {}"
"""The paper's descriptor prompt."""

IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
    "a photo of a {}.",
)
"""The 8-template ImageNet prompt ensemble the paper uses for class embeddings of real models."""

BUILTIN_DESCRIPTORS = ("shapes",)


# --- the bank --------------------------------------------------------------------------
@dataclass
class DescriptorBank:
    """Per-class descriptors pooled into one deduplicated bank.

    Attributes:
        classes: the class names, in order.
        descriptors: every distinct descriptor, in first-seen order (class by class).
        class_descriptors: ``{class: [indices into descriptors]}``; a descriptor that several
            classes list appears once in ``descriptors`` and in each of their lists.
        template: the prompt a descriptor is encoded with (``template.format(descriptor)``); the
            paper's is ``"a photo showing {}"``.
        name: the builtin name, the file's stem, or ``"custom"``.
    """

    classes: list[str]
    descriptors: list[str]
    class_descriptors: dict[str, list[int]]
    template: str = DEFAULT_TEMPLATE
    name: str = "custom"

    def __len__(self) -> int:
        return len(self.descriptors)

    def prompts(self) -> list[str]:
        """The texts that get encoded: ``template.format(d)`` for every descriptor."""
        return [self.template.format(d) for d in self.descriptors]

    def owners(self) -> list[list[int]]:
        """For every descriptor, the indices (into ``classes``) of the classes that list it."""
        owners: list[list[int]] = [[] for _ in self.descriptors]
        for k, name in enumerate(self.classes):
            for d in self.class_descriptors[name]:
                owners[d].append(k)
        return owners

    def for_classes(self, classes: Sequence[str]) -> "DescriptorBank":
        """The bank of ``classes`` only (in that order), pooled and re-indexed from their descriptors.

        Raises:
            InputError: classes the bank does not have (listed, with close matches).
        """
        if isinstance(classes, str):
            classes = [classes]
        missing = [c for c in classes if c not in self.class_descriptors]
        if missing:
            hints = "".join(f" {c!r}:{close_matches(c, self.classes)}" for c in missing[:5]
                            if close_matches(c, self.classes))
            listed = ", ".join(repr(c) for c in missing[:10]) + (" ..." if len(missing) > 10 else "")
            raise InputError(
                f"descriptor bank {self.name!r} has no descriptors for {len(missing)} of the requested classes: "
                f"{listed}.{hints} Its classes are {_preview(self.classes)}; add the missing classes to the "
                "descriptor file or ask only for classes it has."
            )
        return _build({c: [self.descriptors[i] for i in self.class_descriptors[c]] for c in classes},
                      self.template, self.name)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object `load_descriptors` reads back: ``{"name", "template", "classes"}``."""
        return {
            "name": self.name,
            "template": self.template,
            "classes": {c: [self.descriptors[i] for i in self.class_descriptors[c]] for c in self.classes},
        }


def _preview(items: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f" ... ({len(items)} in all)" if len(items) > n else "")


def _build(per_class: Mapping[str, Sequence[str]], template: str, name: str) -> DescriptorBank:
    """Pool already validated per-class lists (duplicates inside a class are dropped)."""
    index: dict[str, int] = {}
    class_descriptors: dict[str, list[int]] = {}
    for cls, texts in per_class.items():
        ids = []
        for text in texts:
            i = index.setdefault(text, len(index))
            if i not in ids:
                ids.append(i)
        class_descriptors[cls] = ids
    return DescriptorBank(list(per_class), list(index), class_descriptors, template, name)


# --- the bundled shapes-world bank -------------------------------------------------------
def shapes_world_descriptors() -> DescriptorBank:
    """The shapes-world bank: 6 shape classes, 23 class-qualified attribute phrases each (138 in all).

    Classes are the world's shapes ("circle", …, as ``mutual_knowledge.data.shapes_world_data``
    names them); their class prompt is ``attribute_prompt("shape", s)`` = "a circle", i.e.
    `class_embeddings` with ``templates=("a {}",)``. Each class's descriptors name the shape together with one other attribute, worded as
    the training captions word it (`clip_lens.toy.world.phrase`):

    * 8 colours: "a red circle", …
    * 2 sizes: "a small circle", "a large circle"
    * 9 positions: "a circle at the top left", "a circle in the center", … (``POSITION_PHRASES``)
    * 4 backgrounds: "a circle on a striped background", …

    The template is ``"{}"`` (the toy tokenizer does not know "photo showing").

    **Why the class name is kept** (the paper strips it from LLM descriptors): the toy model's text
    tower only learned the words and phrasings of its training captions. The hand-written part
    descriptors of `clip_lens.toy.texts.DESCRIPTORS` ("round", "four corners", …) never
    appeared in a caption, and the model maps them essentially at random (their nearest shape class
    is right 16% of the time, chance 16.7%); descriptors without the shape ("a red shape") are
    shared by every class and say nothing about it. Class-qualified phrases are text the model was
    trained on: every descriptor's nearest class embedding is its own class (measured in
    ``tests/plugins/test_mk_descriptors.py``). The price is that the textual concepts D_ŷ of a
    class are, by construction, mostly that class's own descriptors, and the visual concepts share
    knowledge with them only when the regions pick the predicted shape (and then the attribute
    phrase says which colour/position/... the region matched). Numbers on this bank are therefore
    not comparable with the paper's.
    """
    from clip_lens.toy.world import VALUES, phrase

    per_class = {}
    for shape in VALUES["shape"]:
        texts = [phrase([{"colour": c, "shape": shape}]) for c in VALUES["colour"]]
        texts += [phrase([{"size": s, "shape": shape}]) for s in VALUES["size"]]
        texts += [phrase([{"shape": shape, "position": p}]) for p in VALUES["position"]]
        texts += [phrase([{"shape": shape}], b) for b in VALUES["background"]]
        per_class[shape] = texts
    return _build(per_class, "{}", "shapes")


# --- loading -----------------------------------------------------------------------------
def load_descriptors(spec: Union[str, Path, Mapping[str, Any], DescriptorBank]) -> DescriptorBank:
    """A validated descriptor bank from a builtin name, a JSON file or a dict.

    Args:
        spec: ``"shapes"`` (`shapes_world_descriptors`), a path to a UTF-8 JSON file, a dict
            of the same form, or a `DescriptorBank` (returned as is). The JSON has one of
            two forms:

            * plain: ``{"class name": ["descriptor", ...], ...}``, with the paper's template
              ``"a photo showing {}"``;
            * full: ``{"classes": {"class name": ["descriptor", ...], ...}, "template": "{}",
              "name": "mine"}`` (``template`` and ``name`` optional; this is what
              `DescriptorBank.to_dict` writes). An object is read as the full form exactly
              when its ``"classes"`` entry is an object (in the plain form every value is a list).

            Descriptors and class names are stripped; a descriptor listed twice for one class is
            kept once; descriptors shared by classes are pooled once (first-seen order).

    Raises:
        InputError: a missing or unreadable file, invalid JSON (with line and column), a top level
            that is not an object, no classes, a class with an empty list (named), entries that
            are not strings, empty strings, duplicate class names, or a template without exactly
            one ``{}``.
    """
    if isinstance(spec, DescriptorBank):
        return spec
    if isinstance(spec, (str, Path)):
        if str(spec) == "shapes":
            return shapes_world_descriptors()
        data, where, name = _read_json(spec), str(spec), Path(spec).stem
    elif isinstance(spec, Mapping):
        data, where, name = spec, "the descriptor dict", "custom"
    else:
        raise InputError(
            f"load_descriptors takes a builtin name ({', '.join(BUILTIN_DESCRIPTORS)}), a path to a JSON file "
            f"or a dict {{class: [descriptors]}}; got {type(spec).__name__}."
        )
    return _from_object(data, where, name)


def _read_json(spec: Union[str, Path]) -> Any:
    path = Path(spec)
    if not path.exists():
        if isinstance(spec, str) and path.suffix == "" and len(path.parts) == 1:
            raise InputError(
                f"no descriptor bank named {spec!r}; builtins: {', '.join(BUILTIN_DESCRIPTORS)}; or give a path "
                "to a JSON file {class: [descriptors]}." + close_matches(spec, BUILTIN_DESCRIPTORS)
            )
        raise InputError(
            f"descriptor file {str(path)!r} does not exist; give the path to a JSON file {{class: [descriptors]}} "
            f"or a builtin name ({', '.join(BUILTIN_DESCRIPTORS)})."
        )
    if not path.is_file():
        raise InputError(f"descriptor path {str(path)!r} is not a file; give a JSON file {{class: [descriptors]}}.")
    try:
        return read_json(path, "descriptor file", '{"class": ["descriptor", ...]}', object_pairs_hook=_no_duplicate_keys)
    except OSError as error:
        raise InputError(
            f"cannot read descriptor file {str(path)!r}: {error.strerror}; check its permissions."
        ) from error
    except _DuplicateKey as error:
        raise InputError(
            f"descriptor file {str(path)!r} names {error.args[0]!r} twice in one object; merge the two entries."
        ) from error


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _from_object(data: Any, where: str, name: str) -> DescriptorBank:
    if not isinstance(data, Mapping):
        raise InputError(
            f"{where} must hold a JSON object {{\"class\": [\"descriptor\", ...]}}; its top level is "
            f"{_json_type(data)}."
        )
    template = DEFAULT_TEMPLATE
    classes = data
    if isinstance(data.get("classes"), Mapping):
        unknown = sorted(set(map(str, data)) - {"classes", "template", "name"})
        if unknown:
            raise InputError(
                f"{where} has the full form ({{\"classes\": {{...}}}}) but also the keys {unknown}; only "
                "\"classes\", \"template\" and \"name\" are allowed (or use the plain form {class: [descriptors]})."
            )
        classes = data["classes"]
        template = data.get("template", DEFAULT_TEMPLATE)
        if not isinstance(template, str) or template.count("{}") != 1 or _has_other_fields(template):
            raise InputError(
                f"{where}: \"template\" must be a string with exactly one {{}} where the descriptor goes "
                f"(e.g. \"a photo showing {{}}\"); got {template!r}."
            )
        name = data.get("name", name)
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: \"name\" must be a non-empty string; got {name!r}.")
        name = name.strip()
    if not classes:
        raise InputError(f"{where} has no classes; give at least one {{\"class\": [\"descriptor\", ...]}}.")
    per_class: dict[str, list[str]] = {}
    for cls, texts in classes.items():
        if not isinstance(cls, str) or not cls.strip():
            raise InputError(f"{where}: class names must be non-empty strings; got {cls!r}.")
        key = cls.strip()
        if key in per_class:
            raise InputError(f"{where} names class {key!r} twice (after stripping spaces); merge the two entries.")
        if not isinstance(texts, list):
            raise InputError(
                f"{where}: class {key!r} must map to a list of descriptor strings; got {_json_type(texts)}."
            )
        if not texts:
            raise InputError(f"{where}: class {key!r} has an empty descriptor list; give it at least one descriptor.")
        bad = [(i, t) for i, t in enumerate(texts) if not isinstance(t, str)]
        if bad:
            listed = ", ".join(f"item {i + 1} ({_json_type(t)})" for i, t in bad[:5])
            raise InputError(f"{where}: class {key!r} has descriptors that are not strings: {listed}; use strings.")
        empty = [i + 1 for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise InputError(
                f"{where}: class {key!r} has empty descriptors (items {empty[:10]}); remove them or write the text."
            )
        per_class[key] = [t.strip() for t in texts]
    return _build(per_class, template, name)


def _has_other_fields(template: str) -> bool:
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return True
    return False


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), f"a {type(value).__name__}")


# --- encoding ----------------------------------------------------------------------------
def _check_vocabulary(model: "HookedCLIP", texts: Sequence[str], what: str) -> None:
    """A word-level tokenizer (the toy models') maps unknown words to <unk> silently: refuse them."""
    from clip_lens.toy.tokenizer import WordTokenizer

    tokenizer = getattr(model, "tokenizer", None)
    if not isinstance(tokenizer, WordTokenizer):
        return
    unknown = {}
    for text in texts:
        words = [w for w in tokenizer.words(text) if w not in tokenizer.index]
        if words:
            unknown[text] = words
    if unknown:
        listed = "; ".join(f"{t!r} ({', '.join(w)})" for t, w in list(unknown.items())[:5])
        raise InputError(
            f"{len(unknown)} {what}(s) use words this model's tokenizer does not know, which it would encode as "
            f"<unk>: {listed}{' ...' if len(unknown) > 5 else ''}. Rephrase them with the model's vocabulary "
            "(for the shapes world use load_descriptors('shapes'), whose template is '{}')."
        )


def encode_descriptors(model: "HookedCLIP", bank: DescriptorBank, batch_size: int = 256) -> Float[Tensor, "D E"]:
    """Unit-norm text embeddings of ``bank.template.format(d)`` for every descriptor, in bank order.

    Raises:
        InputError: a prompt the tokenizer rejects (too long), or words a word-level tokenizer does
            not know (the toy models).
    """
    prompts = bank.prompts()
    _check_vocabulary(model, prompts, "descriptor prompt")
    return encode_bank(model, TextBank(name=bank.name, texts=prompts, source="list"), batch_size=batch_size)


def class_embeddings(
    model: "HookedCLIP", classes: Sequence[str], templates: Sequence[str] = ("{}",), batch_size: int = 256
) -> Float[Tensor, "K E"]:
    """Prompt-ensemble class embeddings: per class, the mean over ``templates`` of the unit-norm
    embeddings of ``template.format(class)``, renormalised. Use `IMAGENET_TEMPLATES` for
    real models (as the paper); the toy model's class prompts are already full captions ("{}")."""
    if isinstance(classes, str) or not classes:
        raise InputError("class_embeddings needs a non-empty list of class names.")
    if isinstance(templates, str) or not templates:
        raise InputError("class_embeddings needs a non-empty list of templates such as ('a photo of a {}.',).")
    bad = [t for t in templates if not isinstance(t, str) or t.count("{}") != 1 or _has_other_fields(t)]
    if bad:
        raise InputError(f"templates must be strings with exactly one {{}} for the class name; got {bad[:3]}.")
    total = None
    for template in templates:
        prompts = [template.format(c) for c in classes]
        _check_vocabulary(model, prompts, "class prompt")
        emb = encode_bank(model, TextBank(name="classes", texts=prompts, source="list"), batch_size=batch_size)
        total = emb if total is None else total + emb
    return torch.nn.functional.normalize(total / len(templates), dim=-1)


# --- Sinkhorn ----------------------------------------------------------------------------
def sinkhorn(
    logits: Float[Tensor, "*batch L K"],
    n_iters: int = 1000,
    tol: float = 1e-6,
    valid_rows: Optional[Bool[Tensor, "*batch L"]] = None,
    valid_cols: Optional[Bool[Tensor, "*batch K"]] = None,
    check_every: int = 10,
) -> Float[Tensor, "*batch L K"]:
    """Entropic optimal-transport plan with uniform marginals, by Sinkhorn–Knopp in the log domain.

    The plan is ``P = diag(exp f) · exp(logits) · diag(exp g)`` (the paper's ``exp(τ·C)`` with
    τ = 1 on logits that are already scaled, e.g. 2.5 × cosine similarity), with rows summing to
    ``1/L`` (over the valid rows; invalid rows are 0) and columns to ``1/K`` (over the valid
    columns; invalid columns are 0). Rows and columns are normalised alternately, at most
    ``n_iters`` times (the paper's 1000), stopping early once the largest row-marginal error
    (columns are exact after each step) is below ``tol``, checked every ``check_every`` steps.
    Computed in float64; returned in the logits' dtype.

    Entries of ``logits`` may be ``-inf`` (forbidden pairs) as long as every valid row and column
    keeps a finite entry among the valid ones.

    Raises:
        InputError: fewer than 2 dimensions, masks of the wrong shape, NaN/+inf logits, or a valid
            row or column with no finite entry.
    """
    if logits.ndim < 2:
        raise InputError(f"sinkhorn needs logits [..., L, K]; got shape {tuple(logits.shape)}.")
    if torch.isnan(logits).any() or torch.isposinf(logits).any():
        raise InputError("sinkhorn logits contain NaN or +inf; pass finite scores (-inf marks forbidden pairs).")
    C = logits.to(torch.float64)
    *batch, L, K = C.shape
    rows = _mask(valid_rows, (*batch, L), C.device, "valid_rows")
    cols = _mask(valid_cols, (*batch, K), C.device, "valid_cols")
    # a problem without valid rows (columns) has nothing to transport: its plan is all zeros
    rows, cols = rows & cols.any(-1, keepdim=True), cols & rows.any(-1, keepdim=True)
    allowed = rows[..., :, None] & cols[..., None, :]
    C = C.masked_fill(~allowed, -math.inf)
    finite = torch.isfinite(C)
    if (rows & ~finite.any(-1)).any() or (cols & ~finite.any(-2)).any():
        raise InputError("sinkhorn: a valid row or column has no finite logit; mark it invalid or allow some pair.")
    n_rows = rows.sum(-1, keepdim=True).clamp(min=1).to(C.dtype)
    n_cols = cols.sum(-1, keepdim=True).clamp(min=1).to(C.dtype)
    neg_inf = torch.tensor(-math.inf, dtype=C.dtype, device=C.device)
    log_a = torch.where(rows, -n_rows.log(), neg_inf)
    log_b = torch.where(cols, -n_cols.log(), neg_inf)
    f = torch.zeros_like(log_a)
    g = torch.zeros_like(log_b)
    for step in range(1, max(n_iters, 1) + 1):
        f = torch.where(rows, log_a - torch.logsumexp(C + g[..., None, :], dim=-1), neg_inf)
        g = torch.where(cols, log_b - torch.logsumexp(C + f[..., :, None], dim=-2), neg_inf)
        if step % check_every == 0 or step == n_iters:
            plan = torch.exp(C + f[..., :, None] + g[..., None, :])
            if (plan.sum(-1) - log_a.exp()).abs().max() < tol:
                break
    plan = torch.exp(C + f[..., :, None] + g[..., None, :])
    return torch.nan_to_num(plan, nan=0.0).to(logits.dtype)


def _mask(mask: Optional[Tensor], shape: tuple[int, ...], device: torch.device, name: str) -> Tensor:
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if tuple(mask.shape) != tuple(shape):
        raise InputError(f"sinkhorn: {name} must have shape {tuple(shape)}; got {tuple(mask.shape)}.")
    return mask.to(device=device, dtype=torch.bool)


# --- visual and textual concepts -----------------------------------------------------------
CANDIDATE_STAGES = ("intersection+image", "intersection", "union+image", "union", "none")
"""How `candidate_mask` chose an image's candidates (index into this tuple)."""


def candidate_mask(
    region_sim: Float[Tensor, "B L D"],
    region_valid: Bool[Tensor, "B L"],
    image_sim: Float[Tensor, "B D"],
    top_k: int = 500,
    margin: float = 0.02,
    min_candidates: int = 3,
) -> tuple[Bool[Tensor, "B D"], Int[Tensor, "B"]]:
    """The descriptors each image's regions are matched against, and the stage that chose them.

    The paper's code: each valid region's top ``k = min(top_k, D)`` descriptors, intersected across
    the valid regions, keeping those whose similarity to the whole image exceeds the mean
    similarity of the image to all D descriptors minus ``margin`` (stage 0). (The paper's footnote
    words the filter differently, "more than 0.02 above the 50th percentile", i.e. ``> median +
    margin``; we follow the code.)

    Fallback, ours (the code does not handle it): when a stage leaves fewer than
    ``min_candidates`` descriptors, the next is tried: 1 = the intersection without the image
    filter, 2 = the union of the regions' top-k with the filter, 3 = the union. The union holds at
    least k descriptors, so stage 3 always suffices when ``k ≥ min_candidates``; an image without
    valid regions gets no candidates (stage 4, "none").
    """
    B, L, D = region_sim.shape
    k = min(top_k, D)
    top = region_sim.topk(k, dim=-1).indices
    hits = torch.zeros(B, L, D, dtype=torch.bool, device=region_sim.device).scatter_(-1, top, True)
    hits &= region_valid[..., None]
    n_valid = region_valid.sum(-1)
    count = hits.sum(1)
    inter = (count == n_valid[:, None]) & (n_valid[:, None] > 0)
    union = count > 0
    above = image_sim > image_sim.mean(-1, keepdim=True) - margin
    stages = [inter & above, inter, union & above, union]
    mask = torch.zeros(B, D, dtype=torch.bool, device=region_sim.device)
    stage = torch.full((B,), len(stages), dtype=torch.long, device=region_sim.device)
    for s, candidates in enumerate(stages):
        take = (stage == len(stages)) & (candidates.sum(-1) >= min_candidates) & (n_valid > 0)
        mask[take] = candidates[take]
        stage[take] = s
    rest = (stage == len(stages)) & (n_valid > 0)  # fewer than min_candidates descriptors even in the union
    mask[rest] = union[rest]
    stage[rest] = 3
    return mask, stage


def visual_concepts(
    region_emb: Float[Tensor, "B L E"],
    region_valid: Optional[Bool[Tensor, "B L"]],
    image_emb: Float[Tensor, "B E"],
    desc_emb: Float[Tensor, "D E"],
    top_k: int = 500,
    margin: float = 0.02,
    scale: float = 2.5,
    per_region: int = 3,
    n_iters: int = 1000,
    return_regions: bool = False,
) -> Union[list[list[int]], tuple[list[list[int]], list[list[list[int]]]]]:
    """D_v for each image: descriptor indices matched to its regions by optimal transport.

    1. Candidates per image (`candidate_mask`): the intersection of the valid regions' top-k
       descriptors, filtered by similarity to the whole image (with its documented fallback).
    2. Sinkhorn (`sinkhorn`) on ``scale`` × (region · candidate) similarities, uniform
       marginals: it spreads the regions over different descriptors, where a plain argmax sends
       many regions to the same one.
    3. Each valid region's top ``per_region`` candidates by transport mass, region by region,
       deduplicated keeping the first occurrence: at most ``L · per_region`` indices.

    Similarities are dot products of the embeddings as given (pass unit-norm embeddings; the
    paper's region embedding is the mean of three unit-norm prompt embeddings). Images are
    processed as one batch, candidates padded per image with ``-inf``. An image without valid
    regions gets ``[]``.

    With ``return_regions=True`` also returns, per image and region (all L), the region's own
    descriptors, highest transport mass first (``[]`` for an invalid region):
    ``(concepts, region_ids)`` with ``region_ids[b][l]`` a list of at most ``per_region`` indices.
    """
    if region_emb.ndim != 3 or image_emb.ndim != 2 or desc_emb.ndim != 2:
        raise InputError(
            "visual_concepts needs region_emb [B, L, E], image_emb [B, E] and desc_emb [D, E]; got "
            f"{tuple(region_emb.shape)}, {tuple(image_emb.shape)}, {tuple(desc_emb.shape)}."
        )
    B, L, E = region_emb.shape
    if image_emb.shape != (B, E) or desc_emb.shape[1] != E:
        raise InputError(
            f"visual_concepts: shapes disagree: region_emb {tuple(region_emb.shape)}, image_emb "
            f"{tuple(image_emb.shape)}, desc_emb {tuple(desc_emb.shape)} (need [B, L, E], [B, E], [D, E])."
        )
    if per_region < 1 or top_k < 1:
        raise InputError(f"per_region and top_k must be at least 1; got {per_region} and {top_k}.")
    region_valid = _mask(region_valid, (B, L), region_emb.device, "region_valid")
    desc = desc_emb.to(region_emb)
    region_sim = region_emb @ desc.T  # [B, L, D]
    image_sim = image_emb.to(region_emb) @ desc.T  # [B, D]
    mask, _ = candidate_mask(region_sim, region_valid, image_sim, top_k, margin, per_region)
    n_cand = mask.sum(-1)
    width = int(n_cand.max()) if B else 0
    if width == 0:
        empty: list[list[int]] = [[] for _ in range(B)]
        return (empty, [[[] for _ in range(L)] for _ in range(B)]) if return_regions else empty
    # candidate ids per image, padded: sort the mask so candidates come first, in descriptor order
    order = torch.sort((~mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]  # [B, width]
    col_valid = torch.arange(width, device=mask.device)[None, :] < n_cand[:, None]
    logits = scale * torch.gather(region_sim, 2, order[:, None, :].expand(B, L, width))
    rows = region_valid & (n_cand[:, None] > 0)
    plan = sinkhorn(logits, n_iters=n_iters, valid_rows=rows, valid_cols=col_valid)
    plan = plan.masked_fill(~(rows[:, :, None] & col_valid[:, None, :]), -math.inf)
    # rank by plan mass, ties (e.g. a lone region, whose plan row is uniform) broken by similarity:
    # sort by logit, then stably by the plan quantised to 1e-6 of a column's mass (1/width)
    by_logit = logits.masked_fill(plan == -math.inf, -math.inf).argsort(dim=-1, descending=True, stable=True)
    quantised = torch.round(plan.gather(-1, by_logit) * width * 1e6)
    top = by_logit.gather(-1, quantised.argsort(dim=-1, descending=True, stable=True))[..., : min(per_region, width)]
    chosen = torch.gather(order[:, None, :].expand(B, L, width), 2, top)
    picked = torch.gather(col_valid[:, None, :].expand(B, L, width), 2, top) & rows[:, :, None]
    out, region_ids = [], []
    for b in range(B):
        per_region_ids = [chosen[b, l][picked[b, l]].tolist() for l in range(L)]
        region_ids.append(per_region_ids)
        out.append(list(dict.fromkeys(i for ids in per_region_ids for i in ids)))  # region by region, rank by rank
    return (out, region_ids) if return_regions else out


def textual_concepts(
    class_emb: Float[Tensor, "K E"], desc_emb: Float[Tensor, "D E"], predicted: Int[Tensor, "B"], u: int = 50
) -> Int[Tensor, "B u"]:
    """D_ŷ for each image: the ``u' = min(u, D)`` descriptors most similar to the predicted class's
    embedding, most similar first (the paper's u = 50)."""
    predicted = torch.as_tensor(predicted, device=class_emb.device).long().reshape(-1)
    K = class_emb.shape[0]
    if u < 1:
        raise InputError(f"u must be at least 1; got {u}.")
    if predicted.numel() and (predicted.min() < 0 or predicted.max() >= K):
        raise InputError(
            f"predicted classes must lie in [0, {K}) (the rows of class_emb); got {predicted.tolist()[:10]}."
        )
    if class_emb.shape[-1] != desc_emb.shape[-1]:
        raise InputError(f"class_emb {tuple(class_emb.shape)} and desc_emb {tuple(desc_emb.shape)} differ in width.")
    sims = class_emb[predicted] @ desc_emb.to(class_emb).T
    return sims.topk(min(u, desc_emb.shape[0]), dim=-1).indices
