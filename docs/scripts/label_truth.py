"""Head labels against the shapes world's ground truth (issue 16): prints and writes JSON.

Text level: the prototype labeler's ``fits`` on the *evaluation* half of `world_texts` (the
threshold and abstain class were chosen on the other half): per attribute, precision and recall
of "fits its attribute", and the share of unrelated texts (distractors, descriptors) that fit
anything; 95 % bootstrap intervals over texts.

Head level: on a store of shapes-world images, a head's ground-truth attributes are those whose
mean-ablation (direct effect) costs at least ``GT_SHARE`` of the attribute's mean zero-shot margin.
For each bank and m: the labels per head, label precision/recall against that ground truth, and for
every attribute the labels-vs-ablation agreement (of the k heads labelled with it, how many are among
the k heads whose ablation costs it most; k = 1 and agreement 0 when no head has the label). Intervals:
bootstrap over scenes of the ground-truth side (the labels, from one TextSpan run, are held fixed).

    python docs/scripts/label_truth.py --model toy-shapes --images 1000 --out label_truth.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

import clip_lens
from clip_lens import analyses
from clip_lens.collect import collect, shapes_world_images
from clip_lens.head_report import REPORT_SEED, attribute_tasks
from clip_lens.stats import bootstrap_ci
from clip_lens_plugins.ablation.analysis import mean_ablate_heads
from clip_lens_plugins.head_labels.labelers import PrototypeLabeler, calibration_half, model_world_version, world_texts

GT_SHARE = 0.1
"""A head carries an attribute when ablating it costs at least this share of the attribute's mean margin."""


def interval(values: np.ndarray, statistic) -> dict:
    return {"value": float(statistic(values)), "ci95": list(bootstrap_ci(values, statistic))}


def text_truth(labeler: PrototypeLabeler, version: int) -> dict:
    truth = world_texts(version)
    texts = [t for t in truth if not calibration_half(t)]
    predicted = labeler.nearest(texts)
    rows = np.arange(len(texts))
    out = {"threshold": labeler.threshold, "n_eval_texts": len(texts), "attributes": {}}
    for attribute in labeler.properties:
        named = np.array([attribute in truth[t] for t in texts])
        fit = np.array([p == attribute for p in predicted])

        def precision(idx, fit=fit, named=named):
            idx = idx.astype(int)
            return (fit[idx] & named[idx]).sum() / max(fit[idx].sum(), 1)

        def recall(idx, fit=fit, named=named):
            idx = idx.astype(int)
            return (fit[idx] & named[idx]).sum() / max(named[idx].sum(), 1)

        out["attributes"][attribute] = {"n_fit": int(fit.sum()), "n_named": int(named.sum()),
                                        "precision": interval(rows, precision), "recall": interval(rows, recall)}
    single = [i for i, t in enumerate(texts) if len(truth[t]) == 1]
    out["prompts_fit_own_attribute_only"] = sum(predicted[i] in truth[texts[i]] for i in single) / len(single)
    unrelated = [i for i, t in enumerate(texts) if not truth[t]]
    ticked = np.array([predicted[i] is not None for i in unrelated], dtype=float)
    out["unrelated_fit_rate"] = interval(ticked, np.mean)
    out["unrelated_that_fit"] = {texts[i]: predicted[i] for i in unrelated if predicted[i] is not None}
    return out


def per_image_margins(store, tasks, heads):
    """attribute → ``[n_heads + 1, N]`` per-image margin (row 0: the model, then each head ablated)."""
    embedding, terms = store.read("embedding"), store.read("heads")
    variants = [embedding] + [mean_ablate_heads(embedding, terms, store.head_layers, [h]) for h in heads]
    out = {}
    for attribute, (classifier, labels) in tasks.items():
        rows = []
        for emb in variants:
            logits = torch.nn.functional.normalize(emb, dim=-1) @ classifier.T
            true = logits.gather(1, labels[:, None]).squeeze(1)
            other = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
            rows.append((true - other).numpy())
        out[attribute] = np.stack(rows)
    return out


def ground_truth(margins: dict, heads: list[str], idx: np.ndarray) -> tuple[dict, dict]:
    """(head → set of attributes it carries, attribute → heads sorted by margin cost) on images ``idx``."""
    carries = {h: set() for h in heads}
    ranking = {}
    for attribute, rows in margins.items():
        mean = rows[:, idx].mean(1)
        cost = mean[0] - mean[1:]
        ranking[attribute] = [heads[i] for i in np.argsort(-cost, kind="stable")]
        for i, h in enumerate(heads):
            if cost[i] >= GT_SHARE * mean[0]:
                carries[h].add(attribute)
    return carries, ranking


def head_scores(labels: dict, carries: dict, ranking: dict, attributes) -> dict:
    labelled = [h for h, label in labels.items() if label is not None]
    hits = sum(labels[h] in carries[h] for h in labelled)
    carrying = [h for h in labels if carries[h]]
    agreement = {}
    for attribute in attributes:
        with_label = [h for h in labels if labels[h] == attribute]
        top = ranking[attribute][: max(1, len(with_label))]
        agreement[attribute] = len(set(with_label) & set(top)) / len(top)
    return {"precision": hits / max(len(labelled), 1),
            "recall": sum(labels[h] in carries[h] for h in carrying) / max(len(carrying), 1), "agreement": agreement}


def head_truth(model, labeler, store, tasks, bank: str, m: int, n_boot: int) -> dict:
    spans = analyses.get("textspan")(model).run(store, bank=bank, m=m)
    table = analyses.get("head_labels")(model, labeler=labeler).run(spans)
    labels = {h.head: h.label for h in table.heads}
    heads = list(labels)
    margins = per_image_margins(store, tasks, heads)
    n = store.n_images
    carries, ranking = ground_truth(margins, heads, np.arange(n))
    point = head_scores(labels, carries, ranking, tasks)
    rng = np.random.default_rng(0)
    boots = [head_scores(labels, *ground_truth(margins, heads, rng.integers(0, n, n)), tasks) for _ in range(n_boot)]

    def ci(get):
        values = np.array([get(b) for b in boots])
        return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]

    return {
        "bank": bank, "m": m,
        "heads": {h.head: {"label": h.label or "none", "abstention": h.abstention, "confidence": h.confidence,
                           "ground_truth": sorted(carries[h.head]), "texts": h.texts, "fits": h.fits} for h in table.heads},
        "precision": {"value": point["precision"], "ci95": ci(lambda b: b["precision"])},
        "recall": {"value": point["recall"], "ci95": ci(lambda b: b["recall"])},
        "agreement": {a: {"value": point["agreement"][a], "ci95": ci(lambda b, a=a: b["agreement"][a]),
                          "labelled": [h for h in heads if labels[h] == a], "top_ablation": ranking[a][:3]} for a in tasks},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-shapes")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--boot", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path("label_truth.json"))
    args = parser.parse_args()
    model = clip_lens.HookedCLIP.from_pretrained(args.model)
    version = model_world_version(args.model)
    labeler = PrototypeLabeler.from_model(model)
    report = {"model": args.model, "world_version": version, "gt_share": GT_SHARE, "text": text_truth(labeler, version), "runs": []}
    print(json.dumps(report["text"], indent=1))
    with tempfile.TemporaryDirectory() as tmp:
        source = shapes_world_images(args.images, REPORT_SEED, model.cfg.image_size[0])
        store = collect(model, source, Path(tmp) / "store", chunk_size=250, batch_size=125, progress=False)
        tasks = attribute_tasks(model, args.images, REPORT_SEED)
        for bank in ("shapes-attributes", "shapes"):
            for m in (10, 20):
                run = head_truth(model, labeler, store, tasks, bank, m, args.boot)
                report["runs"].append(run)
                summary = {k: run[k] for k in ("bank", "m", "precision", "recall", "agreement")}
                summary["labels"] = {h: (v["label"], v["ground_truth"]) for h, v in run["heads"].items()}
                print(json.dumps(summary))
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
