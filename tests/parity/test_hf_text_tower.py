"""Models whose text tower is a Hugging Face model (open_clip ``HFTextEncoder``) are hooked exactly.

Everything offline: tiny Hugging Face configs are written into ``tmp_path`` with ``transformers``'
config classes and handed to open_clip through ``text_cfg.hf_model_name`` (a local directory);
the image towers are 2-layer, 64-wide ViTs. Hub tokenizers are replaced by random in-vocab ids
with pad ids at the end of some rows, so the attention mask built from the pad id matters. Where
a tokenizer is needed, a tiny word-level one is written next to the config.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Optional

import open_clip
import pytest
import torch

import clip_lens
from clip_lens import CheckpointNotFoundError, ClipLensError, HookedCLIP, HookNameError
from tests.helpers import build_open_clip, ok, randomize_vectors

ATOL = 1e-5
EMBED_DIM = 32
VISION = {"layers": 2, "width": 64, "patch_size": 16, "head_width": 16, "image_size": 64}
BATCH_LENGTHS = (5, 12, None)  # tokens per row before padding; None: a full row, no padding
SEQ = 24


def _hf_config(kind: str):
    """A tiny Hugging Face config of ``kind`` (2 layers, 4 heads, vocab 1000)."""
    from transformers import M2M100Config, MT5Config, RobertaConfig, XLMRobertaConfig

    if kind == "roberta":
        return RobertaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=128, max_position_embeddings=80)
    if kind == "xlm-roberta":  # 32 wide = EMBED_DIM: with hf_proj_type None there is no projection
        return XLMRobertaConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=80)
    if kind == "m2m_100":  # NLLB's architecture: encoder of an encoder-decoder, sinusoidal positions
        return M2M100Config(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                            max_position_embeddings=80)
    if kind == "mt5":  # relative positions, pad id 0, no BOS
        return MT5Config(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=1, num_heads=4)
    raise ValueError(kind)


def _write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer: <s>=0 <pad>=1 </s>=2 <unk>=3, 'w{i}' = i + 4; '<s> words </s>'."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(996)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(str(directory))


# case -> (open_clip name, HF config kind, text_cfg overrides, other overrides, what it covers)
CASES = {
    "roberta-mean-mlp": ("roberta-ViT-B-32", "roberta", {}, {},
                         "as configured: masked mean pooling, MLP projection (hf_proj_type default), QuickGELU ViT"),
    "roberta-cls-linear": ("roberta-ViT-B-32", "roberta", {"hf_pooler_type": "cls_pooler", "hf_proj_type": "linear"}, {},
                           "CLS pooling through RoBERTa's own pooler (dense + tanh), linear projection"),
    "xlm-roberta-mean-identity": ("xlm-roberta-base-ViT-B-32", "xlm-roberta", {"hf_proj_type": None}, {},
                                  "width == embed_dim and no proj_type: no projection at all"),
    "nllb-m2m100-cls-linear": ("nllb-clip-base", "m2m_100", {}, {},
                               "as configured: M2M100 encoder, first-token pooling, linear projection"),
    "mt5-mean-mlp": ("mt5-base-ViT-B-32", "mt5", {}, {}, "mT5 encoder (relative positions, pad id 0)"),
    "coca-roberta": ("coca_roberta-ViT-B-32", "roberta", {"width": 64}, {"multimodal_cfg": {"layers": 1, "width": 64, "heads": 4}},
                     "CoCa: output_tokens=True, the encoder returns (embedding, token features)"),
}
EXPECTED_CFG = {  # pool_type, proj_type, context_length (RoBERTa-like positions start at pad_id + 1)
    "roberta-mean-mlp": ("mean_pooler", "mlp", 78),
    "roberta-cls-linear": ("cls_pooler", "linear", 78),
    "xlm-roberta-mean-identity": ("mean_pooler", "none", 78),
    "nllb-m2m100-cls-linear": ("cls_pooler", "linear", 80),
    "mt5-mean-mlp": ("mean_pooler", "mlp", 512),
    "coca-roberta": ("mean_pooler", "linear", 78),
}


def _overrides(case: str, directory: Path, hf_model_pretrained: Optional[bool] = False) -> dict:
    _name, _kind, text, other, _ = CASES[case]
    text_cfg = {"hf_model_name": str(directory), "hf_tokenizer_name": str(directory), **text}
    if hf_model_pretrained is not None:
        text_cfg["hf_model_pretrained"] = hf_model_pretrained
    return {"embed_dim": EMBED_DIM, "vision_cfg": dict(VISION), "text_cfg": text_cfg, **other}


def _tokens(config, seed: int = 0) -> torch.Tensor:
    """Rows of [BOS] words EOS pad…, one full row; words avoid every special id (all < 4)."""
    g = torch.Generator().manual_seed(seed)
    bos, eos, pad = config.bos_token_id, config.eos_token_id, config.pad_token_id
    rows = []
    for length in BATCH_LENGTHS:
        length = SEQ if length is None else length
        words = torch.randint(4, config.vocab_size, (length,), generator=g).tolist()
        row = ([bos] if bos is not None else []) + words[: length - 1 - (bos is not None)] + [eos]
        rows.append(row + [pad] * (SEQ - len(row)))
    return torch.tensor(rows)


def _forward_parts(out):
    """open_clip forward output as (image, text, logit_scale[, logit_bias]); CoCa returns a dict."""
    if isinstance(out, dict):
        return tuple(out[k] for k in ("image_features", "text_features", "logit_scale", "logit_bias") if k in out)
    return tuple(out)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory, one_torch_thread):
    """(case, directory, open_clip model, HookedCLIP, images, tokens, open_clip reference outputs)."""
    name, kind, *_ = CASES[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    _hf_config(kind).save_pretrained(str(directory))
    model = build_open_clip(name, _overrides(request.param, directory))
    randomize_vectors(model)
    hooked = HookedCLIP.from_open_clip(model, name)
    tokens = _tokens(model.text.config)
    images = torch.randn(len(tokens), 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = {
            "image": model.encode_image(images, normalize=True),
            "text": model.encode_text(tokens, normalize=True),
            "text_raw": model.encode_text(tokens, normalize=False),
            "forward": _forward_parts(model(images, tokens)),
        }
    return request.param, directory, model, hooked, images, tokens, ref


def test_case_builds_the_claimed_text_tower(case):
    """The configs exercise what CASES says (guards against an override that silently does nothing)."""
    name, directory, model, hooked, *_ = case
    assert type(model.text).__name__ == "HFTextEncoder"
    pool_type, proj_type, context_length = EXPECTED_CFG[name]
    cfg = hooked.text.cfg
    assert (cfg.tower, cfg.n_layers, cfg.n_heads, cfg.vocab_size, cfg.d_embed) == ("text", 2, 4, 1000, EMBED_DIM)
    assert cfg.d_model == (32 if name.startswith("xlm") else 64) and cfg.d_head == cfg.d_model // 4
    assert (cfg.pool_type, cfg.extra["proj_type"], cfg.context_length) == (pool_type, proj_type, context_length)
    assert cfg.extra["hf_model_name"] == str(directory)
    assert cfg.extra["pad_token_id"] == model.text.config.pad_token_id
    # parameters are shared with the open_clip model, not copied
    assert hooked.text.encoder is model.text


def test_text_tower_has_only_pooled_and_embed_hooks(case):
    _, _, _, hooked, *_ = case
    assert [n for n in hooked.hook_dict if n.startswith("text.")] == ["text.hook_pooled", "text.hook_text_embed"]


def test_encode_image_parity(case):
    _, _, _, hooked, images, _, ref = case
    with torch.no_grad():
        assert _max_diff(ref["image"], hooked.encode_image(images, normalize=True)) <= ATOL


def test_encode_text_parity(case):
    _, _, _, hooked, _, tokens, ref = case
    with torch.no_grad():
        assert _max_diff(ref["text"], hooked.encode_text(tokens, normalize=True)) <= ATOL
        raw = hooked.encode_text(tokens)
    assert _max_diff(ref["text_raw"], raw) <= ATOL * max(1.0, ref["text_raw"].abs().max().item())


def test_forward_parity(case):
    _, _, _, hooked, images, tokens, ref = case
    with torch.no_grad():
        out = hooked(images, tokens)
    assert len(out) == len(ref["forward"])
    for r, o in zip(ref["forward"], out):
        assert _max_diff(r, o) <= ATOL


def test_pad_tokens_are_masked(case):
    """The test tokens exercise the pad mask: replacing pads by a word changes exactly the padded rows."""
    _, _, model, hooked, _, tokens, ref = case
    pad = model.text.config.pad_token_id
    unpadded = tokens.masked_fill(tokens == pad, 7)
    with torch.no_grad():
        changed = (hooked.encode_text(unpadded, normalize=True) - ref["text"]).abs().amax(-1)
    padded_rows = (tokens == pad).any(-1)
    assert padded_rows.tolist() == [True, True, False]
    assert (changed[padded_rows] > 1e-3).all() and (changed[~padded_rows] <= ATOL).all()


def test_run_with_cache_holds_pooled_and_text_embed(case):
    _, _, model, hooked, images, tokens, ref = case
    with torch.no_grad():
        out, cache = hooked.run_with_cache(images, tokens)
        # what hook_pooled should hold: open_clip's pooler over the HF transformer's output
        mask = (tokens != model.text.config.pad_token_id).long()
        pooled = model.text.pooler(model.text.transformer(input_ids=tokens, attention_mask=mask), mask)
        projected = model.text.proj(cache["text.hook_pooled"])
    scale = max(1.0, ref["text_raw"].abs().max().item())
    assert _max_diff(cache["text.hook_text_embed"], ref["text_raw"]) <= ATOL * scale
    assert _max_diff(cache["text.hook_pooled"], pooled) <= ATOL * max(1.0, pooled.abs().max().item())
    assert _max_diff(projected, ref["text_raw"]) <= ATOL * scale
    for r, o in zip(ref["forward"], out):
        assert _max_diff(r, o) <= ATOL
    # the tower's pre-hook on proj lives only during its own forward; no hook state is left behind
    assert not model.text.proj._forward_pre_hooks
    assert all(not hp._forward_hooks for hp in hooked.hook_dict.values())


def test_zeroing_text_embed_zeroes_encode_text(case):
    _, _, _, hooked, _, tokens, ref = case
    with torch.no_grad(), hooked.hooks(fwd_hooks=[("text.hook_text_embed", lambda act, hook: torch.zeros_like(act))]):
        ablated = hooked.encode_text(tokens)
    assert ablated.abs().max().item() == 0.0
    with torch.no_grad():  # and the hook is gone afterwards
        assert _max_diff(hooked.encode_text(tokens, normalize=True), ref["text"]) <= ATOL


def test_intervention_on_pooled_feeds_the_projection(case):
    _, _, model, hooked, _, tokens, ref = case
    with torch.no_grad():
        _, cache = hooked.run_with_cache(None, tokens, names_filter="text.hook_pooled")
        with hooked.hooks(fwd_hooks=[("text.hook_pooled", lambda act, hook: 2 * act)]):
            doubled = hooked.encode_text(tokens)
        expected = model.text.proj(2 * cache["text.hook_pooled"])
    assert _max_diff(doubled, ref["text_raw"]) > 1e-3
    assert _max_diff(doubled, expected) <= ATOL * max(1.0, expected.abs().max().item())


def test_image_decomposition_still_sums_to_the_embedding(case):
    _, _, _, hooked, images, *_ = case
    parts = hooked.decompose(images)
    assert parts.relative_error().max().item() <= 1e-4


def test_unknown_text_hook_says_the_hf_internals_are_not_hooked(case):
    _, _, _, hooked, images, tokens, _ = case
    with pytest.raises(HookNameError, match="Hugging Face model: it exposes only text.hook_pooled"):
        hooked.run_with_cache(None, tokens, names_filter=["text.blocks.0.hook_resid_pre"])
    _, cache = hooked.run_with_cache(None, tokens)
    assert torch.equal(cache.text["hook_text_embed"], cache["text.hook_text_embed"])
    with pytest.raises(HookNameError, match="not hooked"):
        cache.text.accumulated_resid()


# --- loading: local checkpoints, the Hugging Face cache, and nothing downloaded --------------------


@pytest.fixture
def no_network(monkeypatch):
    """Fail on any download: sockets, the Hugging Face hub client, transformers and open_clip fetchers.

    Attempts are also recorded and checked at teardown: a library that swallows the error and falls
    back to its cache must not make the test pass.
    """
    import huggingface_hub
    import huggingface_hub.file_download
    import open_clip.factory
    import open_clip.pretrained

    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for module, attr in ((huggingface_hub, "hf_hub_download"), (huggingface_hub.file_download, "hf_hub_download"),
                         (huggingface_hub, "snapshot_download"), (open_clip.factory, "download_pretrained"),
                         (open_clip.factory, "download_pretrained_from_hf"), (open_clip.pretrained, "download_pretrained")):
        monkeypatch.setattr(module, attr, refuse, raising=False)
    yield
    assert not attempts, f"network access attempted: {attempts[:3]}"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache (``HF_HUB_CACHE``) for this test."""
    import huggingface_hub.constants

    cache = tmp_path / "hf_hub_cache"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _cache_repo(cache: Path, repo: str, kind: str) -> Path:
    """Lay out ``repo``'s config.json and tokenizer as ``hf download`` leaves them in the cache."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    _hf_config(kind).save_pretrained(str(snapshot))
    _write_tokenizer(snapshot)
    return snapshot


def _save(model: torch.nn.Module, path: Path, extra: dict | None = None) -> Path:
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file({**state, **(extra or {})}, str(path))
    return path


def _assert_same_model(model: torch.nn.Module, hooked: HookedCLIP, kind: str) -> None:
    tokens = _tokens(_hf_config(kind))
    images = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _max_diff(model.encode_text(tokens, normalize=True), hooked.encode_text(tokens, normalize=True)) <= ATOL
        assert _max_diff(model.encode_image(images, normalize=True), hooked.encode_image(images, normalize=True)) <= ATOL


@pytest.mark.parametrize("case_name", ["roberta-mean-mlp", "nllb-m2m100-cls-linear"])
def test_checkpoint_round_trip_offline(tmp_path, no_network, case_name):
    """A saved open_clip state dict reloads by name + local path, with the HF config from a directory."""
    name, kind, *_ = CASES[case_name]
    directory = tmp_path / "hf"
    _hf_config(kind).save_pretrained(str(directory))
    model = build_open_clip(name, _overrides(case_name, directory), seed=3)
    randomize_vectors(model, seed=4)
    path = _save(model, tmp_path / "clip.safetensors")
    # no hf_model_pretrained in the overrides: loading must not try to read HF weights from `directory`
    hooked = HookedCLIP.from_pretrained(name, pretrained=path, config_overrides=_overrides(case_name, directory, None))
    assert hooked.pretrained == str(path)
    _assert_same_model(model, hooked, kind)


def test_checkpoint_with_position_ids_of_old_transformers_loads(tmp_path, no_network):
    """Checkpoints saved with transformers < 4.31 hold the (now non-persistent) position_ids buffer."""
    directory = tmp_path / "hf"
    _hf_config("roberta").save_pretrained(str(directory))
    model = build_open_clip("roberta-ViT-B-32", _overrides("roberta-mean-mlp", directory), seed=5)
    path = _save(model, tmp_path / "old.safetensors", {"text.transformer.embeddings.position_ids": torch.arange(80)[None]})
    hooked = HookedCLIP.from_pretrained("roberta-ViT-B-32", pretrained=path,
                                        config_overrides=_overrides("roberta-mean-mlp", directory))
    _assert_same_model(model, hooked, "roberta")


def test_config_and_tokenizer_come_from_the_hf_cache_offline(tmp_path, hf_cache, no_network):
    """With 'roberta-base' in the HF cache, the stock config loads a local checkpoint without network."""
    snapshot = _cache_repo(hf_cache, "roberta-base", "roberta")
    source = build_open_clip("roberta-ViT-B-32", _overrides("roberta-mean-mlp", snapshot), seed=6)
    path = _save(source, tmp_path / "clip.safetensors")
    hooked = HookedCLIP.from_pretrained(
        "roberta-ViT-B-32", pretrained=path, config_overrides={"embed_dim": EMBED_DIM, "vision_cfg": VISION}
    )
    assert hooked.text.cfg.extra["hf_model_name"] == "roberta-base"  # the repo id, not the snapshot path
    _assert_same_model(source, hooked, "roberta")
    tokens = hooked.to_tokens(["w1 w2 w3", "w996"])  # open_clip's HFTokenizer, 77 long, from the cache
    assert tokens.shape == (2, 77)
    assert tokens[0, :6].tolist() == [0, 5, 6, 7, 2, 1] and tokens[1, :4].tolist() == [0, 3, 2, 1]
    with torch.no_grad():
        assert _max_diff(hooked.encode_text(["w1 w2 w3", "w996"]), source.encode_text(tokens)) <= ATOL


@pytest.mark.parametrize("name, repo, with_checkpoint", [
    ("roberta-ViT-B-32", "roberta-base", False),
    ("nllb-clip-base", "facebook/nllb-200-distilled-600M", True),
    ("xlm-roberta-large-ViT-H-14", "xlm-roberta-large", True),
])
def test_missing_hf_config_says_what_to_download_without_downloading(
    tmp_path, hf_cache, no_network, monkeypatch, name, repo, with_checkpoint
):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be built or fetched")

    monkeypatch.setattr(open_clip, "create_model", refuse)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    pretrained = None
    if with_checkpoint:  # the HF files are checked before a (large) checkpoint is read
        pretrained = tmp_path / "clip.safetensors"
        pretrained.write_bytes(b"not read")
    with pytest.raises(CheckpointNotFoundError) as info:
        HookedCLIP.from_pretrained(name, pretrained=pretrained)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    for part in (f"'{repo}'", "config.json", "tokenizer", f"hf download {repo}", str(hf_cache),
                 "config_overrides={'text_cfg': {'hf_model_name': DIR, 'hf_tokenizer_name': DIR}}"):
        assert part in message, (part, message)


def test_missing_tokenizer_files_raise_checkpoint_not_found(tmp_path, no_network):
    directory = tmp_path / "hf"  # config.json only, no tokenizer files
    _hf_config("roberta").save_pretrained(str(directory))
    hooked = HookedCLIP.from_pretrained("roberta-ViT-B-32", config_overrides=_overrides("roberta-mean-mlp", directory))
    with pytest.raises(CheckpointNotFoundError, match=r"has no tokenizer: put config.json and the tokenizer files"):
        hooked.to_tokens(["w1 w2"])


def test_missing_transformers_says_how_to_install(monkeypatch):
    import open_clip.hf_model

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be built")

    monkeypatch.setattr(open_clip.hf_model, "transformers", None)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    with pytest.raises(ClipLensError, match=r"pip install 'clip-lens\[hf\]'"):
        HookedCLIP.from_pretrained("roberta-ViT-B-32")


def test_list_models_includes_hf_text_tower_models():
    names = clip_lens.list_models()
    for name in ("roberta-ViT-B-32", "xlm-roberta-base-ViT-B-32", "xlm-roberta-large-ViT-H-14", "nllb-clip-base",
                 "nllb-clip-large"):
        assert name in names


def test_cli_hooks_lists_the_two_text_hooks(hf_cache, no_network):
    from typer.testing import CliRunner

    _cache_repo(hf_cache, "roberta-base", "roberta")
    result = ok(CliRunner(), ["hooks", "--model", "roberta-ViT-B-32", "--tower", "text"])
    lines = [line.split() for line in result.stdout.splitlines() if line.startswith("text.")]
    assert lines == [["text.hook_pooled", "[1,", "64]"], ["text.hook_text_embed", "[1,", "512]"]]
    assert "Hugging Face" in result.stdout
