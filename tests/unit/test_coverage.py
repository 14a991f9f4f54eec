"""Which open_clip checkpoints HookedCLIP accepts: a measured figure, and the table agrees with the code."""

from __future__ import annotations

import re

import open_clip
import pytest
import timm
import torch
from open_clip.factory import get_model_config

from clip_lens.loading import TIMM_TOWERS, model_coverage, unsupported_feature
from clip_lens.towers.timm_vit import check_trunk


def test_every_pretrained_pair_is_accepted():
    """Every image tower of open_clip 3.3 with pretrained weights (ViTs, SigLIP/SigLIP2, EVA, PE-Core,
    timm ViTs, ViTamin, ResNets, ConvNeXts, FastViTs; HF text towers included): 196 of 196 pairs."""
    rows = model_coverage()
    pairs = sum(row.n_tags for row in rows)
    accepted = sum(row.n_tags for row in rows if row.reason is None)
    assert pairs == len(open_clip.list_pretrained())
    assert accepted == pairs, [f"{row.name}: {row.reason}" for row in rows if row.reason and row.n_tags]
    refused = {row.name: row.reason for row in rows if row.reason}
    # what stays refused (configs without weights), each with its reason
    assert "Swin" in refused["swin_base_patch4_window7_224"]
    assert "relative position" in refused["vit_relpos_medium_patch16_cls_224"]


@pytest.mark.parametrize("timm_name", sorted({
    get_model_config(name)["vision_cfg"]["timm_model_name"]
    for name in open_clip.list_models()
    if get_model_config(name)["vision_cfg"].get("timm_model_name")
}))
def test_timm_table_agrees_with_the_structural_check(timm_name):
    """A timm architecture the table accepts passes check_trunk on its real module tree (built on
    the meta device), and one the table refuses fails it: the table cannot silently drift."""
    rows = [reason for pattern, reason in TIMM_TOWERS if re.search(pattern, timm_name)]
    with torch.device("meta"):
        trunk = timm.create_model(timm_name, pretrained=False)
    problem = check_trunk(trunk)
    if not rows:  # unlisted: the structural check is the decision
        assert unsupported_feature({"vision_cfg": {"timm_model_name": timm_name}}) == (
            None if problem is None else f"timm image tower {timm_name}: {problem}")
    elif rows[0] is None:
        assert problem is None, problem
    else:
        assert problem is not None, f"{timm_name} is refused by the table but passes check_trunk"


def test_unlisted_timm_architecture_is_checked_structurally(monkeypatch):
    """A timm name no table row matches is built on the meta device and refused by its block class."""
    config = get_model_config("ViT-B-16-SigLIP")
    config["vision_cfg"]["timm_model_name"] = "vit_small_patch16_18x2_224"  # ParallelThingsBlock
    reason = unsupported_feature(config)
    assert reason is not None and "ParallelThingsBlock" in reason


def test_models_all_prints_every_model_with_a_reason():
    from typer.testing import CliRunner

    from clip_lens.cli import app

    result = CliRunner().invoke(app, ["models", "--all"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(open_clip.list_models()) + 1
    by_name = {line.split()[0]: line for line in lines[:-1]}
    assert by_name["ViT-SO400M-14-SigLIP-384"].endswith("supported")
    for name in ("RN50", "convnext_base_w", "convnext_large_d", "MobileCLIP-S2"):
        assert by_name[name].endswith("supported"), by_name[name]
    assert "Swin" in by_name["swin_base_patch4_window7_224"]
    accepted, pairs = map(int, re.search(r"(\d+) of (\d+) pretrained", lines[-1]).groups())
    assert pairs == 196 and accepted == 196
