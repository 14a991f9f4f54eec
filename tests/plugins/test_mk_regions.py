"""Mutual-knowledge visual concepts: features, GDC foreground, parts, visual prompts, CorLoc."""

import json
from collections import deque

import einops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clip_lens import HookedCLIP
from clip_lens.errors import InputError
from clip_lens.stats import bootstrap_ci
from clip_lens.toy.world import ShapesWorld, batch_images
from clip_lens_plugins.mutual_knowledge.regions import (
    box_iou, concept_parts, connected_components, corloc, fit_ellipses, fix_sign, folder_boxes, gaussian_blur,
    grid_size, keep_largest_components, mask_box, parts_to_masks, patch_features, pca_foreground, pixel_normalization,
    prominent_region, random_boxes_like, region_embeddings, spectral_vector, upsample_mask, visual_prompts,
)
from tests.seeds import TEST_SEEDS

N_SCENES = 200


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy():
    return HookedCLIP.from_pretrained("toy-shapes")


@pytest.fixture(scope="module")
def held_out(toy):
    """200 held-out one-object scenes: images, object masks, both feature sources."""
    world = ShapesWorld(seed=TEST_SEEDS[6], n_objects=1)
    scenes = [world.scene(i) for i in range(N_SCENES)]
    images = batch_images(scenes)
    masks = torch.from_numpy(np.stack([s.object_masks[0] for s in scenes]))
    features = {source: patch_features(toy, images, source) for source in ("tokens", "keys")}
    return images, masks, features


def _corloc(foreground, masks) -> float:
    pred = mask_box(upsample_mask(foreground, masks.shape[-1]))
    return corloc(pred, list(mask_box(masks)[:, None]))


def _random_corloc(foreground, masks, seeds=range(5)) -> float:
    pred = mask_box(upsample_mask(foreground, masks.shape[-1]))
    gt = list(mask_box(masks)[:, None])
    return max(corloc(random_boxes_like(pred, masks.shape[-1], torch.Generator().manual_seed(s)), gt) for s in seeds)


# --- features ----------------------------------------------------------------------------------
def test_patch_features_are_last_block_tokens_and_unbiased_keys(toy, held_out):
    images = held_out[0][:3]
    last = toy.cfg.n_layers - 1
    _, cache = toy.run_with_cache(images, names_filter=[f"blocks.{last}.hook_resid_pre", f"blocks.{last}.hook_resid_post"])
    assert grid_size(toy) == (8, 8)
    tokens = patch_features(toy, images, "tokens")
    torch.testing.assert_close(tokens, cache[f"blocks.{last}.hook_resid_post"][:, 1:])
    attn = toy.blocks[last].attn
    expected = einops.einsum(toy.blocks[last].ln1(cache[f"blocks.{last}.hook_resid_pre"]), attn.W_K, "b n m, h m d -> b n h d")
    keys = patch_features(toy, images, "keys")
    assert keys.shape == (3, 64, toy.cfg.n_heads * toy.cfg.d_head)
    torch.testing.assert_close(keys, einops.rearrange(expected, "b n h d -> b n (h d)")[:, 1:], atol=1e-5, rtol=1e-5)
    assert attn.mha.in_proj_bias.chunk(3)[1].abs().max() > 1e-3  # the bias is really there and really removed


def test_wrong_inputs_raise_input_errors(toy):
    with pytest.raises(InputError, match="32x32 but .* takes 64x64"):
        patch_features(toy, torch.zeros(1, 3, 32, 32))
    with pytest.raises(InputError, match="source must be one of tokens, keys"):
        patch_features(toy, torch.zeros(1, 3, 64, 64), source="values")
    with pytest.raises(InputError, match="32x32 but .* takes 64x64"):
        region_embeddings(toy, torch.zeros(1, 3, 32, 32), torch.ones(1, 2, 32, 32, dtype=torch.bool))
    with pytest.raises(InputError, match="features have 10 patches but the grid 8x8 has 64"):
        prominent_region(torch.randn(2, 10, 4), (8, 8))


# --- GDC ---------------------------------------------------------------------------------------
def test_second_singular_vector_is_the_gram_eigenvector():
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(3, 40, 16, generator=gen) + torch.randn(3, 1, 16, generator=gen)
    f = F.normalize(features, dim=-1)
    for joint in (False, True):
        gram_input = f.reshape(1, -1, 16) if joint else f
        values, vectors = torch.linalg.eigh(gram_input @ gram_input.transpose(1, 2))  # ascending
        assert ((values[:, -2] - values[:, -3]) / values[:, -1] > 1e-3).all()  # a separated eigenvalue
        second = vectors[..., -2].reshape(3, 40)
        ours = spectral_vector(features, index=1, joint=joint)
        dots = (ours * second).sum(-1) if not joint else (ours * second).sum().reshape(1)
        torch.testing.assert_close(dots.abs(), torch.ones_like(dots), atol=1e-4, rtol=0)


def test_sign_fix_makes_the_positive_side_a_minority():
    v = torch.tensor([[1.0, 2.0, -1.0], [1.0, 1.0, 1.0], [1.0, -1.0, 0.5], [-1.0, -2.0, 1.0], [1.0, -1.0, -3.0]])
    torch.testing.assert_close(
        fix_sign(v), torch.tensor([[-1.0, -2.0, 1.0], [1.0, 1.0, 1.0], [-1.0, 1.0, -0.5], [-1.0, -2.0, 1.0], [1.0, -1.0, -3.0]])
    )
    fixed = fix_sign(torch.randn(50, 31, generator=torch.Generator().manual_seed(1)))
    assert ((fixed > 0).float().mean(-1) < 0.5).all()


def test_connected_components_on_a_hand_made_grid():
    grid = torch.tensor(
        [[1, 1, 0, 0, 1, 0],
         [0, 1, 0, 1, 0, 0],   # (1,3) touches (0,4) only diagonally: separate under 4-connectivity
         [1, 1, 0, 0, 0, 1],
         [1, 0, 0, 1, 0, 1],
         [1, 1, 1, 1, 0, 1],   # a U that only joins at the bottom row
         [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    labels = connected_components(grid[None])[0]
    expected = {  # component id = 1 + row-major index of its first pixel
        1: [(0, 0), (0, 1), (1, 1), (2, 0), (2, 1), (3, 0), (4, 0), (4, 1), (4, 2), (4, 3), (3, 3)],
        5: [(0, 4)], 10: [(1, 3)], 18: [(2, 5), (3, 5), (4, 5)],
    }
    want = torch.zeros_like(labels)
    for label, cells in expected.items():
        for r, c in cells:
            want[r, c] = label
    assert torch.equal(labels, want)
    kept = keep_largest_components(grid[None], min_second=3)[0]
    assert torch.equal(kept, (want == 1) | (want == 18))
    assert torch.equal(keep_largest_components(grid[None], min_second=4)[0], want == 1)
    assert not keep_largest_components(torch.zeros(1, 4, 4, dtype=torch.bool)).any()


def test_connected_components_match_breadth_first_search():
    masks = torch.rand(12, 13, 11, generator=torch.Generator().manual_seed(2)) < 0.55
    labels = connected_components(masks)
    for mask, label in zip(masks.numpy(), labels.numpy()):
        seen, ref, next_id = np.zeros_like(mask), np.zeros(mask.shape, int), 0
        for start in zip(*np.nonzero(mask)):
            if seen[start]:
                continue
            next_id += 1
            queue = deque([start])
            seen[start] = True
            while queue:
                r, c = queue.popleft()
                ref[r, c] = next_id
                for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                    if 0 <= nr < mask.shape[0] and 0 <= nc < mask.shape[1] and mask[nr, nc] and not seen[nr, nc]:
                        seen[nr, nc] = True
                        queue.append((nr, nc))
        pairs = set(zip(ref[mask].tolist(), label[mask].tolist()))  # a bijection between the two labellings
        assert len(pairs) == next_id == len(set(label[mask].tolist()))
        assert (label[~mask] == 0).all()


def test_gdc_recovers_a_planted_object_and_drops_specks():
    gen = torch.Generator().manual_seed(3)
    b, c = 4, 32
    background, obj = torch.zeros(c), torch.zeros(c)
    background[[0, 2]], obj[[1, 2]] = 1.0, 1.0  # a shared component: positive affinities, as in CLIP
    truth = torch.zeros(b, 8, 8, dtype=torch.bool)
    truth[0, 1:4, 2:5] = truth[1, 4:7, 4:8] = truth[2, 0:2, 0:3] = truth[3, 5:8, 1:3] = True
    speck = torch.zeros_like(truth)
    speck[0, 7, 7] = speck[2, 6, 6] = True  # isolated object-like patches: removed by the cleanup
    is_obj = einops.rearrange(truth | speck, "b h w -> b (h w) 1")
    features = torch.where(is_obj, obj, background) + 0.01 * torch.randn(b, 64, c, generator=gen)
    for joint in (False, True):
        assert torch.equal(prominent_region(features, (8, 8), joint=joint), truth)
    assert torch.equal(upsample_mask(truth, 16)[:, ::2, ::2], truth)
    assert upsample_mask(truth, (16, 24)).shape == (b, 16, 24)


def test_gdc_corloc_on_held_out_shapes_world(held_out):
    """Per image, on a test world (200 scenes): the paper's GDC (2nd vector) tokens 0.010, keys 0.070; the toy's
    object features are anti-correlated with the background (negative affinities), so the 1st vector splits
    them: keys 0.560 (0.50–0.57 on four worlds). PCA keys 0.135 (0.11–0.17). Random boxes ≤ 0.015."""
    _, masks, features = held_out
    paper = {s: prominent_region(f, (8, 8)) for s, f in features.items()}
    first = {s: prominent_region(f, (8, 8), vector=0) for s, f in features.items()}
    scores = {s: _corloc(fg, masks) for s, fg in paper.items()}
    first_scores = {s: _corloc(fg, masks) for s, fg in first.items()}
    best, best_first = max(scores, key=scores.get), max(first_scores, key=first_scores.get)
    random_paper, random_first = _random_corloc(paper[best], masks), _random_corloc(first[best_first], masks)
    assert scores[best] >= 0.03 and scores[best] >= 3 * max(random_paper, 0.005)
    assert first_scores[best_first] >= 0.45 and random_first <= 0.05
    assert 0.08 <= _corloc(pca_foreground(features["keys"], (8, 8)), masks) <= 0.3


def test_joint_gdc_second_vector_is_ill_defined_on_the_toy(held_out):
    """Over the stacked keys of 200 scenes the 2nd and 3rd singular values nearly tie (within 1–5 % on five
    worlds) and neither the 2nd vector nor its sign follows the object, so joint GDC with the paper's vector
    finds the object in 0.000–0.145 of the scenes depending on the world (0.145 on seed 1000, 0.005 here:
    not a code path, the sign fix picks the minority side of a ~40/60 split unrelated to the object). The
    1st vector is stable: joint CorLoc 0.68–0.71 on the same five worlds (the analysis' ``auto`` takes it)."""
    _, masks, features = held_out
    f = F.normalize(features["keys"], dim=-1).reshape(-1, features["keys"].shape[-1])
    values = torch.linalg.svdvals(f)
    assert (values[1] - values[2]) / values[1] < 0.05  # measured 0.013 on the test world, 0.046 on seed 1000
    obj = F.interpolate(masks[:, None].float(), size=(8, 8), mode="area").flatten() > 0.3
    first, second = (spectral_vector(features["keys"], index=i, joint=True).flatten() for i in (0, 1))
    correlation = lambda v: float(np.corrcoef(v.numpy(), obj.float().numpy())[0, 1])
    assert abs(correlation(second)) < 0.2 < 0.6 < correlation(first)  # measured −0.08 and 0.72
    joint_first = prominent_region(features["keys"], (8, 8), joint=True, vector=0)
    hits = (box_iou(mask_box(upsample_mask(joint_first, 64)), mask_box(masks)) > 0.5).float().numpy()
    assert bootstrap_ci(hits)[0] > 0.5  # measured 0.680 [0.615, 0.745]
    assert _corloc(joint_first, masks) > _corloc(prominent_region(features["keys"], (8, 8), joint=True), masks) + 0.3


# --- parts -------------------------------------------------------------------------------------
def _planted_parts(n_clusters=3, seed=4):
    gen = torch.Generator().manual_seed(seed)
    foreground = torch.zeros(3, 4, 4, dtype=torch.bool)
    foreground[:, 1:4, 0:3] = True
    foreground[1, 0, 3] = False
    centres = F.normalize(torch.randn(n_clusters, 24, generator=gen), dim=-1) * 3
    truth = torch.randint(n_clusters, (3, 16), generator=gen)
    features = centres[truth] + 0.1 * torch.randn(3, 16, 24, generator=gen)
    return features, foreground, truth.view(3, 4, 4)


def test_kmeans_recovers_planted_clusters():
    features, foreground, truth = _planted_parts()
    parts = concept_parts(features, foreground, n_parts=3, method="kmeans", seed=0)
    assert torch.equal(parts == -1, ~foreground)
    pairs = set(zip(truth[foreground].tolist(), parts[foreground].tolist()))
    assert len(pairs) == 3 and len({p for _, p in pairs}) == 3  # a bijection between clusters and parts
    sizes = torch.bincount(parts[foreground], minlength=3)
    assert (sizes[:-1] >= sizes[1:]).all()  # numbered by decreasing size
    assert torch.equal(parts, concept_parts(features, foreground, n_parts=3, method="kmeans", seed=0))


def test_pca_parts_cover_exactly_the_foreground():
    features, foreground, truth = _planted_parts(n_clusters=4, seed=5)
    parts = concept_parts(features, foreground, n_parts=3, method="pca")
    assert torch.equal(parts >= 0, foreground)
    assert parts.max() <= 2 and set(parts[foreground].tolist()) == {0, 1, 2}
    masks = parts_to_masks(parts, 3, size=8)
    assert masks.shape == (3, 3, 8, 8) and torch.equal(masks.sum(1) == 1, upsample_mask(foreground, 8))


def test_parts_reject_more_parts_than_foreground_patches():
    features, foreground, _ = _planted_parts()
    n_fg = int(foreground.sum())
    with pytest.raises(InputError, match=f"L={n_fg + 1} is larger than the {n_fg} foreground patches"):
        concept_parts(features, foreground, n_parts=n_fg + 1)
    with pytest.raises(InputError, match="at least 1, got 0"):
        concept_parts(features, foreground, n_parts=0, method="kmeans")


# --- visual prompts ----------------------------------------------------------------------------
def _disk(radius=10.0, centre=(30.5, 24.5), size=64):
    yy, xx = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    return (xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius**2


def test_fit_ellipses_recover_disks_ellipses_and_empty_parts():
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    theta = torch.tensor(0.5)
    u = ((xx - 32) * torch.cos(theta) + (yy - 30) * torch.sin(theta)) / 20
    v = (-(xx - 32) * torch.sin(theta) + (yy - 30) * torch.cos(theta)) / 8
    speck = torch.zeros(64, 64, dtype=torch.bool)
    speck[0:4, 58:62] = True  # a second, smaller component: ignored
    masks = torch.stack([_disk() | speck, u**2 + v**2 <= 1, torch.zeros(64, 64, dtype=torch.bool)])[None]
    ellipses = fit_ellipses(masks)
    torch.testing.assert_close(ellipses[0, 0, :4], torch.tensor([30.5, 24.5, 10.0, 10.0]), atol=0.25, rtol=0)
    torch.testing.assert_close(ellipses[0, 1], torch.tensor([32.0, 30.0, 20.0, 8.0, 0.5]), atol=0.3, rtol=0.02)
    assert ellipses[0, 2].isnan().all()
    assert fit_ellipses(masks, largest_component=False)[0, 0, 0] > 31.5  # the speck pulls the centre


def test_prompts_draw_a_red_ellipse_and_grey_or_blur_the_outside():
    mean, std = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)
    gen = torch.Generator().manual_seed(6)
    pixels = torch.rand(1, 3, 64, 64, generator=gen)
    images = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    masks = torch.stack([_disk(), torch.zeros(64, 64, dtype=torch.bool)])[None]
    prompts = visual_prompts(images, masks, mean, std)
    assert prompts.shape == (1, 2, 3, 3, 64, 64)
    shown = prompts * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    yy, xx = torch.meshgrid(torch.arange(64) + 0.5, torch.arange(64) + 0.5, indexing="ij")
    radius = torch.hypot(xx - 30.5, yy - 24.5)
    changed = (shown[0, 0, 0] - pixels[0]).abs().amax(0) > 1e-5  # the "ellipse" prompt's changed pixels
    red = torch.tensor([1.0, 0.0, 0.0]).view(3, 1)
    torch.testing.assert_close(shown[0, 0, 0][:, changed], red.expand(3, int(changed.sum())), atol=1e-5, rtol=0)
    assert (radius[changed] - 10).abs().max() <= 1.0  # a thin ring on the fitted circle
    assert 0.8 * 2 * torch.pi * 10 <= changed.sum() <= 1.5 * 2 * torch.pi * 10
    inside, outside = radius < 8.5, radius > 11.5
    for kind in (1, 2):  # grey, blur: the inside is untouched
        torch.testing.assert_close(shown[0, 0, kind][:, inside], pixels[0][:, inside], atol=1e-5, rtol=0)
    grey = shown[0, 0, 1][:, outside]
    torch.testing.assert_close(grey, grey[:1].expand_as(grey), atol=1e-5, rtol=0)  # R = G = B
    torch.testing.assert_close(grey[0], (torch.tensor([0.299, 0.587, 0.114]).view(3, 1) * pixels[0][:, outside]).sum(0), atol=1e-5, rtol=0)
    blurred = gaussian_blur(images, 3)[0] * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    torch.testing.assert_close(shown[0, 0, 2][:, outside], blurred[:, outside], atol=1e-5, rtol=0)
    assert (shown[0, 0, 2][:, outside] - pixels[0][:, outside]).abs().mean() > 0.05
    torch.testing.assert_close(prompts[0, 1], images.expand(3, -1, -1, -1))  # empty part: unchanged image


def test_gaussian_blur_keeps_constants_and_rejects_even_kernels():
    flat = torch.full((2, 3, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 11), flat)
    impulse = torch.zeros(1, 1, 21, 21)
    impulse[0, 0, 10, 10] = 1
    blurred = gaussian_blur(impulse, 11)
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0))
    weights = blurred[0, 0, 10, 5:16] / blurred[0, 0, 10, 10]  # OpenCV's sigma 2.0 for an 11 kernel
    torch.testing.assert_close(weights, torch.exp(-(torch.arange(-5, 6.0) ** 2) / 8), atol=1e-6, rtol=1e-5)
    with pytest.raises(InputError, match="odd positive"):
        gaussian_blur(flat, 4)


def test_region_embeddings_average_the_prompt_embeddings(toy, held_out):
    images = held_out[0][:2]
    masks = torch.zeros(2, 2, 64, 64, dtype=torch.bool)
    masks[0, 0], masks[1, 0], masks[1, 1] = _disk(), _disk(8, (40.5, 40.5)), _disk(6, (12.5, 50.5))
    embeds, valid = region_embeddings(toy, images, masks, batch_size=4)
    assert torch.equal(valid, torch.tensor([[True, False], [True, True]]))
    assert embeds.shape == (2, 2, toy.cfg.d_embed) and (embeds[0, 1] == 0).all()
    mean, std = pixel_normalization(toy)
    assert mean == std == (0.5, 0.5, 0.5)
    prompts = visual_prompts(images, masks, mean, std)[1, 1]
    torch.testing.assert_close(embeds[1, 1], toy.encode_image(prompts, normalize=True).mean(0).detach(), atol=1e-5, rtol=1e-5)
    assert ((embeds[valid].norm(dim=-1) > 0.5) & (embeds[valid].norm(dim=-1) <= 1 + 1e-5)).all()


# --- CorLoc ------------------------------------------------------------------------------------
def test_boxes_iou_and_corloc_on_hand_made_boxes():
    mask = torch.zeros(2, 10, 12, dtype=torch.bool)
    mask[0, 2:5, 3:9] = True
    torch.testing.assert_close(mask_box(mask)[0], torch.tensor([3.0, 2.0, 9.0, 5.0]))
    assert mask_box(mask)[1].isnan().all()
    a = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 2, 2]])
    b = torch.tensor([[5.0, 0, 15, 10], [0, 0, 10, 10], [5, 5, 6, 6]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1 / 3, 1.0, 0.0]))
    pred = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [float("nan")] * 4])
    gts = [[[5.0, 0, 15, 10]], [[20, 20, 30, 30], [0, 0, 10, 8]], [[0, 0, 10, 5]], [[0, 0, 10, 10]]]
    assert corloc(pred, gts) == 0.25  # IoU 1/3 miss; 0.8 with the second box: hit; exactly 0.5: miss; NaN: miss
    assert corloc(pred, gts, threshold=0.3) == 0.75
    with pytest.raises(InputError, match="4 predicted boxes but ground-truth boxes for 3 images"):
        corloc(pred, gts[:3])
    boxes = random_boxes_like(torch.tensor([[3.0, 2, 9, 5], [0, 0, 64, 10]]), 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(boxes[:, 2:] - boxes[:, :2], torch.tensor([[6.0, 3], [64, 10]]))
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all()


def test_folder_boxes_map_boxes_through_resize_and_centre_crop(toy, tmp_path):
    (tmp_path / "images").mkdir()
    image = np.zeros((96, 128, 3), np.uint8)  # h=96, w=128: shortest side 96 -> 64, width 85, crop offset 10
    image[20:60, 40:72] = (255, 0, 0)
    Image.fromarray(image).save(tmp_path / "images" / "wide.png")
    (tmp_path / "boxes.json").write_text(json.dumps({"wide.png": [[40, 20, 72, 60], [0, 0, 8, 8]]}))
    data = folder_boxes(tmp_path, toy.preprocess)
    assert data.names == ["wide.png"] and data.images.shape == (1, 3, 64, 64)
    scale = 85 / 128
    torch.testing.assert_close(data.boxes[0][0], torch.tensor([40 * scale - 10, 20 * 64 / 96, 72 * scale - 10, 60 * 64 / 96]))
    assert (data.boxes[0][1, 2] - data.boxes[0][1, 0]) == 0  # outside the crop: empty, clipped to the border
    shown = data.images[0] * 0.5 + 0.5
    red = (shown[0] > 0.5) & (shown[1] < 0.5)
    torch.testing.assert_close(mask_box(red[None])[0], data.boxes[0][0], atol=1.0, rtol=0)


def test_folder_boxes_errors(toy, tmp_path):
    with pytest.raises(InputError, match="boxes.json is missing"):
        folder_boxes(tmp_path, toy.preprocess)
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    for table, message in [
        ({"b.png": [[0, 0, 5, 5]]}, "names 'b.png' but there is no image"),
        ({"a.png": [0, 0, 5, 5]}, "wrap a single box in a list"),
        ({"a.png": [[0, 0, 50, 5]]}, "not inside its 40x30 image"),
        ({"a.png": [[5, 0, 5, 5]]}, "x0 < x1"),
    ]:
        (tmp_path / "boxes.json").write_text(json.dumps(table))
        with pytest.raises(InputError, match=message):
            folder_boxes(tmp_path, toy.preprocess)
    (tmp_path / "boxes.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        folder_boxes(tmp_path, toy.preprocess)
