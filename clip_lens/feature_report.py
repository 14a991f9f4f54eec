"""SAE feature dashboards: what ``clip-lens sae inspect`` writes and the report's "Features" section.

For an SAE on an image-tower hook point of a [`HookedCLIP`][clip_lens.HookedCLIP], `inspect_features`
picks features, names them with the bank texts nearest to their decoder direction carried through the
frozen read-out (`clip_lens.sae.naming.name_features`), and finds the images each one fires on
most, with patch activation maps (`clip_lens.sae.naming.top_activating`). The result
(`FeatureInspection`) gives the JSON (`to_dict`), one PNG dashboard per
feature (`dashboards`) and HTML (`render_section`, `render_page`).

**Which features** (`rank_features`), when none are given: the features that fire on at least
one image, the *selective* ones first (firing on at most `DENSE_FREQUENCY` = half of the
images), most frequent first; then the *dense* ones (firing on more than half of the images, which
rarely mean one thing), least frequent first. Features that never fire are never chosen. Frequency
is the share of images whose image-level activation (the largest over the positions the SAE was
trained on) is positive. Ties go to the lower feature index.

**Names** need a hook whose directions reach the embedding linearly (residual-stream hooks, the last
MLP output, ``hook_pooled``, ``hook_image_embed``; see `clip_lens.sae.naming.readout_kind`).
For any other hook (``attn.hook_z``, ``mlp.hook_post``, a tower with an attentional pooler)
`naming_problem` says why, and the dashboards are made without names.
"""

from __future__ import annotations

import dataclasses
import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import torch
from torch import Tensor

from clip_lens.errors import ClipLensError, InputError
from clip_lens.figures import figure_png, png_data_url

if TYPE_CHECKING:
    from clip_lens.banks import TextBank
    from clip_lens.hooked_clip import HookedCLIP
    from clip_lens.sae.model import SAE
    from clip_lens.sae.naming import FeatureNames, TopActivations

DENSE_FREQUENCY = 0.5
"""A feature firing on more than this share of the images is *dense* and ranked after the selective ones."""
RANKING = (
    f"features that fire on at most {DENSE_FREQUENCY:.0%} of the images, most frequent first, then the dense ones "
    "(firing on more), least frequent first; features that never fire are left out"
)
MAX_RANKING_BYTES = 256 * 2**20
"""Up to this size the activation maps of every feature are kept in one pass over the images; above
it, a first pass (one image per feature) ranks the features and a second one keeps the chosen ones'."""


def dashboard_name(feature: int) -> str:
    """File name of a feature's dashboard PNG."""
    return f"sae_feature_{int(feature)}.png"


def _training_source(sae: "SAE") -> dict:
    meta = sae.cfg.metadata.get("clip_lens_training", {}) if isinstance(sae.cfg.metadata, dict) else {}
    source = meta.get("args", {}).get("source", {}) if isinstance(meta, dict) else {}
    return source if isinstance(source, dict) else {}


def recorded_model(sae: "SAE") -> Optional[str]:
    """The model an SAE says it was trained on (clip_lens training metadata, else ``cfg.model_name``)."""
    return _training_source(sae).get("model") or sae.cfg.model_name or None


def check_sae(model: "HookedCLIP", sae: "SAE") -> None:
    """Refuse an SAE that feature dashboards cannot run on ``model``.

    Raises:
        InputError: a text-tower or decomposition-term SAE (dashboards show images); an SAE that
            clip_lens trained on another model or on other weights.
        HookNameError: the SAE's hook point does not exist in ``model``.
    """
    hook = sae.cfg.hook_name
    if not hook:
        raise InputError("the SAE's cfg.json names no hook point (metadata.hook_name); it cannot be run on a model.")
    if hook.startswith("term:"):
        raise InputError(
            f"the SAE reads a decomposition term ({hook}), not a hook point, so it has no activations per image "
            "patch to show; inspect an SAE trained on a hook point."
        )
    if hook.startswith("text."):
        raise InputError(
            f"the SAE reads the text-tower hook {hook}; feature dashboards show images, so they need an SAE on "
            "an image-tower hook (blocks.{l}.hook_resid_post, …)."
        )
    model.check_hook_name(hook)
    source = _training_source(sae)
    trained_on = source.get("model")
    if trained_on and model.model_name and trained_on != model.model_name:
        raise InputError(f"the SAE was trained on model '{trained_on}', not '{model.model_name}'; use '{trained_on}'.")
    weights = source.get("weights")
    if weights:
        from clip_lens.collect import weights_fingerprint

        here = weights_fingerprint(model)
        if here != weights:
            raise InputError(
                f"the SAE was trained on other weights of {model.model_name} (fingerprint {weights}, this model "
                f"{here}); load the checkpoint it was trained with (--pretrained)."
            )


def naming_problem(model: "HookedCLIP", hook_name: str) -> Optional[str]:
    """Why the features of an SAE at ``hook_name`` cannot be named through the read-out (None: they can)."""
    from clip_lens.sae.naming import readout_kind

    try:
        readout_kind(model, hook_name)
    except (ClipLensError, NotImplementedError) as exc:
        return " ".join(str(exc).split())
    return None


def rank_features(frequency: Tensor, n: int, dense: float = DENSE_FREQUENCY) -> list[int]:
    """The ``n`` features to show first, by the ranking in the module docstring (`RANKING`).

    Args:
        frequency: ``[d_sae]`` share of the images each feature fires on.
        n: how many to return at most (fewer when fewer features fire).
        dense: the share above which a feature counts as dense.
    """
    freq = frequency.detach().double().cpu().tolist()
    alive = [i for i, f in enumerate(freq) if f > 0]
    selective = sorted((i for i in alive if freq[i] <= dense), key=lambda i: (-freq[i], i))
    dense_ones = sorted((i for i in alive if freq[i] > dense), key=lambda i: (freq[i], i))
    return (selective + dense_ones)[: max(0, int(n))]


@dataclass
class FeatureInspection:
    """Chosen features of one SAE over one image set: names, frequencies, top images."""

    top: "TopActivations"
    """Top images of the chosen features, in display order (``top.features``)."""
    names: Optional["FeatureNames"]
    """Their names (None when naming is off or impossible, see `names_note`)."""
    k: int
    selection: str
    """``"given"`` (features chosen by the caller) or ``"ranked"`` (`RANKING`)."""
    bank: Optional[str] = None
    names_note: Optional[str] = None
    """Why the features are not named, when a bank was asked for but naming is impossible."""
    counts: Optional[dict] = None
    """``alive``/``dense``/``dead`` feature counts over all ``d_sae`` features (ranked selections only)."""
    sae_cfg: Optional[dict] = None

    @property
    def features(self) -> list[int]:
        return [int(f) for f in self.top.features]

    def to_dict(self) -> dict:
        """JSON-ready: the settings, and per feature (in display order) its frequency, names with
        cosines, and top images (index in the image set, activation, and id when known)."""
        top = self.top
        ids = getattr(top.source, "ids", None)
        rows = []
        for r, feature in enumerate(self.features):
            keep = [(int(i), float(v)) for i, v in zip(top.indices[r], top.values[r]) if int(i) >= 0 and float(v) > 0]
            row: dict[str, Any] = {
                "feature": feature,
                "frequency": float(top.frequency[r]),
                "max_activation": float(top.values[r, 0]) if top.values.shape[1] else 0.0,
                "names": None if self.names is None else [[t, s] for t, s in self.names.top(feature)],
                "top_indices": [i for i, _ in keep],
                "top_values": [v for _, v in keep],
                "dashboard": dashboard_name(feature),
            }
            if ids:
                row["top_ids"] = [str(ids[i]) for i, _ in keep]
            rows.append(row)
        return {
            "sae": self.sae_cfg,
            "hook_name": top.hook_name,
            "positions": top.positions,
            "images": getattr(top.source, "description", None),
            "n_images": top.n_images,
            "k": self.k,
            "selection": self.selection,
            "ranking": RANKING if self.selection == "ranked" else "the features given, in that order",
            **(self.counts or {}),
            "bank": self.bank,
            "readout": None if self.names is None else self.names.readout,
            "names_note": self.names_note,
            "features": rows,
        }

    def dashboards(self, dpi: int = 100) -> dict[str, bytes]:
        """``{file name: PNG}``: per feature, its top images with patch maps and its name (TopActivations.plot)."""
        return {dashboard_name(f): figure_png(self.top.plot(f, names=self.names), dpi=dpi) for f in self.features}


@torch.no_grad()
def inspect_features(
    model: "HookedCLIP",
    sae: "SAE",
    images: Any,
    *,
    features: Optional[Sequence[int]] = None,
    n_features: int = 16,
    k: int = 9,
    bank: Union[None, str, "TextBank"] = None,
    names_top: int = 5,
    batch_size: int = 32,
    progress: bool = False,
) -> FeatureInspection:
    """Pick features (``features``, else the first ``n_features`` by `rank_features`), name
    them with ``bank`` and find their ``k`` top images among ``images``.

    Args:
        model: the model the SAE was trained on (checked by `check_sae`).
        sae: an SAE on an image-tower hook point.
        images: anything `top_activating` takes (folder, tensor,
            `ImageSource`, collected [`Store`][clip_lens.collect.Store]).
        bank: a `TextBank` or bank name to name features with (None: no
            names). When the hook cannot be named (`naming_problem`) the features stay
            unnamed and `FeatureInspection.names_note` says why.
        names_top: texts kept per feature.

    Raises:
        InputError: bad arguments, an SAE that does not fit the model, or no feature firing on
            any image (ranked selection).
    """
    from clip_lens.banks import TextBank, load_bank
    from clip_lens.sae.naming import name_features, top_activating

    for name, value in (("n_features", n_features), ("k", k), ("names_top", names_top), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}.")
    check_sae(model, sae)
    sae = sae.to(model.device)
    text_bank = None
    note = None
    if bank is not None:
        text_bank = bank if isinstance(bank, TextBank) else load_bank(bank)
        note = naming_problem(model, sae.cfg.hook_name)
        if note is not None:
            text_bank = None
    options = dict(batch_size=batch_size, progress=progress)
    counts = None
    if features is not None:
        chosen = [int(f) for f in features]
        if not chosen:
            raise InputError("no features given; pass feature indices such as 0,5,9.")
        bad = [f for f in chosen if not 0 <= f < sae.cfg.d_sae]
        if bad:
            raise InputError(f"features {bad[:5]} are out of range: the SAE has features 0..{sae.cfg.d_sae - 1}.")
        if len(set(chosen)) != len(chosen):
            raise InputError(f"features {chosen} name a feature twice; give each once.")
        top = top_activating(model, sae, images, k=k, features=chosen, **options)
        selection = "given"
    else:
        grid = model.cfg.grid_size or (1, 1)
        everything = sae.cfg.d_sae * k * int(grid[0]) * int(grid[1]) * 4 <= MAX_RANKING_BYTES
        first = top_activating(model, sae, images, k=k if everything else 1, **options)
        chosen = rank_features(first.frequency, n_features)
        if not chosen:
            raise InputError(
                f"none of the SAE's {sae.cfg.d_sae} features fires on any of the {first.n_images} images; check that "
                "the SAE belongs to this model and hook point, or use more (or other) images."
            )
        if everything:
            rows = torch.tensor(chosen, dtype=torch.long)
            top = dataclasses.replace(
                first, features=first.features[rows], indices=first.indices[rows], values=first.values[rows],
                maps=None if first.maps is None else first.maps[rows], frequency=first.frequency[rows],
            )
        else:
            top = top_activating(model, sae, images, k=k, features=chosen, **options)
        frequency = first.frequency
        n_dense = int((frequency > DENSE_FREQUENCY).sum())
        n_dead = int((frequency <= 0).sum())
        counts = {"d_sae": sae.cfg.d_sae, "alive": sae.cfg.d_sae - n_dead, "dense": n_dense, "dead": n_dead}
        selection = "ranked"
    names = None
    if text_bank is not None:
        names = name_features(model, sae, text_bank, top=names_top, features=chosen)
        top = dataclasses.replace(top, names=names)
    cfg = sae.cfg
    sae_cfg = {"hook_name": cfg.hook_name, "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
               "k": cfg.k, "model": recorded_model(sae)}
    bank_name = None if bank is None else (bank.name if isinstance(bank, TextBank) else str(bank))
    return FeatureInspection(top, names, k, selection, bank_name, note, counts, sae_cfg)


# --- html ----------------------------------------------------------------------------------------
def _img(name: str, data: bytes) -> str:
    return (f'<img alt="{html.escape(name)}" loading="lazy" '
            f'src="{png_data_url(data)}">')


EVERYWHERE = 0.99
"""A feature firing on at least this share of the images fires on (nearly) every image."""


def everywhere_note(summary: dict) -> Optional[str]:
    """Why the features shown fire on (nearly) every image, when at least half of them do (None otherwise):
    frequency counts an image when a feature fires at any position the SAE reads, so for an SAE on many
    positions per image (patches) a feature active on a few patches of each image reads 100%."""
    shown = [row["frequency"] for row in summary.get("features", [])]
    everywhere = sum(f >= EVERYWHERE for f in shown)
    if not shown or 2 * everywhere < len(shown):
        return None
    positions = str(summary.get("positions"))
    many = positions not in ("cls", "pooled")
    why = (f"frequency counts an image when the feature fires at any of the positions the SAE reads ({positions}), "
           "so a feature active on a few patches of every image reads 100%: look at its patch maps for where it fires"
           if many else "these features are dense: they rarely mean one thing")
    return (f"{everywhere} of the {len(shown)} features shown fire on at least {EVERYWHERE:.0%} of the images, "
            f"although the most selective are shown first: {why}. A sparser SAE (more L1, a smaller k) or one on "
            "the class token (positions cls) gives per-image features.")


def render_section(summary: dict, pngs: dict[str, bytes], heading: str = "h2") -> str:
    """HTML of a `FeatureInspection.to_dict` summary: a table of the features (frequency,
    names) and each one's dashboard (embedded from ``pngs``, keyed by `dashboard_name`)."""
    esc = html.escape
    sub = "h3" if heading == "h2" else "h4"
    sae = summary.get("sae") or {}
    k_text = f", k = {sae['k']}" if sae.get("k") else ""
    intro = (
        f"<p>SAE on <code>{esc(str(summary['hook_name']))}</code> ({esc(str(sae.get('architecture', '?')))}, "
        f"{sae.get('d_sae', '?')} features{k_text}), positions <code>{esc(str(summary['positions']))}</code>; "
        f"{summary['n_images']} images: {esc(str(summary.get('images') or ''))}.</p>"
    )
    if "alive" in summary:
        intro += (
            f"<p>{summary['alive']} of {summary['d_sae']} features fire on at least one image ({summary['dense']} "
            f"on more than half of them); {summary['dead']} never fire. Shown: {esc(summary['ranking'])}.</p>"
        )
    note = everywhere_note(summary)
    if note:
        intro += f'<p class="warn">{esc(note)}</p>'
    if summary.get("readout"):
        how = ("exact" if summary["readout"] == "exact"
               else "direct path only: later blocks read the direction too, so names are a logit-lens approximation")
        intro += (f"<p>Names: the texts of bank <code>{esc(str(summary.get('bank')))}</code> nearest (cosine) to "
                  f"each feature's decoder direction carried to the embedding through the frozen read-out ({how}).</p>")
    elif summary.get("names_note"):
        intro += f'<p class="warn">Features are not named: {esc(summary["names_note"])}</p>'
    rows, figures = [], []
    for row in summary["features"]:
        f = row["feature"]
        names = row.get("names") or []
        listed = "".join(f"<li>{esc(t)} <small>({s:.2f})</small></li>" for t, s in names)
        rows.append(
            f'<tr><td><a href="#feature-{f}"><b>{f}</b></a></td><td>{row["frequency"]:.1%}</td>'
            f"<td>{row['max_activation']:.3g}</td><td>{f'<ol>{listed}</ol>' if listed else '—'}</td></tr>"
        )
        data = pngs.get(row["dashboard"])
        if data is not None:
            title = f"feature {f}" + (f": {esc(names[0][0])}" if names else "")
            figures.append(f'<figure id="feature-{f}"><{sub}>{title}</{sub}>{_img(row["dashboard"], data)}'
                           f"<figcaption>fires on {row['frequency']:.1%} of the images; top images by activation "
                           f"(image index, activation), patch activations overlaid.</figcaption></figure>")
    table = ("<table><tr><th>feature</th><th>fires on</th><th>max activation</th><th>names (cosine)</th></tr>"
             + "".join(rows) + "</table>")
    return f"<{heading}>Features</{heading}>" + intro + table + "".join(figures)


def render_page(summary: dict, pngs: dict[str, bytes], title: str) -> str:
    """A self-contained HTML page (dashboards embedded) around `render_section`."""
    from clip_lens.figures import html_page

    return html_page(title, render_section(summary, pngs), "features.json")
