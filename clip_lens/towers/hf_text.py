"""Hooked Hugging Face text towers: open_clip's ``HFTextEncoder``, run exactly as open_clip runs it.

``roberta-ViT-B-32``, ``xlm-roberta-*``, ``nllb-clip-*``, ``mt5-*`` and ``coca_roberta-ViT-B-32``
keep a Hugging Face ``transformers`` model as their text tower (``text_cfg.hf_model_name``).
[`HFTextTower`][clip_lens.towers.hf_text.HFTextTower] wraps that encoder (sharing its parameters) and calls its own ``forward``,
so the attention mask (from the pad token id), the pooler and the projection are open_clip's;
only the pooled vector and the text embedding are hooked. The transformer's internals (attention,
MLP, residual stream) have no hook points: they are Hugging Face code, not reproduced here.

Building such a model needs the Hugging Face ``config.json`` (and, for `HookedCLIP.to_tokens`,
the tokenizer files). `prepare_hf_text_cfg` finds them locally (a directory, or the Hugging
Face cache) and never downloads unless the caller allows it; otherwise it raises
[`CheckpointNotFoundError`][clip_lens.CheckpointNotFoundError] saying what to download and where to put it.
This module imports no ``transformers`` code itself: ``open_clip.hf_model`` already tries to
(leaving ``transformers = None`` when it is missing, which `require_transformers` reports).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from jaxtyping import Float, Int
from open_clip.hf_configs import arch_dict
from open_clip.hf_model import HFTextEncoder
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from clip_lens.config import TowerConfig
from clip_lens.errors import CheckpointNotFoundError, ClipLensError, UnsupportedArchitectureError

UNHOOKED_NOTE = (
    "This model's text tower is a Hugging Face model: it exposes only text.hook_pooled and "
    "text.hook_text_embed (its attention, MLP and residual stream are not hooked)."
)

DEFAULT_CONTEXT_LENGTH = 77  # open_clip's tokenizer length when text_cfg has no context_length
ROBERTA_LIKE = ("roberta", "xlm-roberta")  # position ids start at pad_token_id + 1
# transformers builds an empty tokenizer without complaint when these are missing: check first
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "sentencepiece.bpe.model", "spiece.model")
TOKENIZER_FILES = (
    "tokenizer_config.json, tokenizer.json, special_tokens_map.json and vocab.json/merges.txt "
    "or sentencepiece.bpe.model/spiece.model, as the repository has them"
)


def _pooler_name(pooler: nn.Module) -> str:
    """open_clip's registry name of a pooler module: ``MeanPooler`` -> ``"mean_pooler"``."""
    from open_clip.hf_model import _camel2snake

    return _camel2snake(type(pooler).__name__)


def _proj_type(proj: nn.Module) -> str:
    if isinstance(proj, nn.Identity):
        return "none"
    return "linear" if isinstance(proj, nn.Linear) else "mlp"


def _max_tokens(config: Any) -> int:
    """How many token positions the Hugging Face encoder accepts."""
    n_pos = getattr(config, "max_position_embeddings", None)
    if n_pos is None:  # relative positions (mT5): no hard limit, T5's training length
        return int(getattr(config, "n_positions", None) or 512)
    if config.model_type in ROBERTA_LIKE:  # position ids count from pad_token_id + 1
        return int(n_pos) - int(config.pad_token_id) - 1
    return int(n_pos)


def _first_attr(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


class HFTextTower(nn.Module):
    """Hooked wrapper of open_clip's ``HFTextEncoder`` (a Hugging Face text tower), parameters shared.

    Hooks (under ``text.`` in [`HookedCLIP`][clip_lens.HookedCLIP]); only these two exist:

    ======================  ==================================================================
    ``hook_pooled``         ``[batch, d_model]`` pooled vector before the projection: masked
                            mean (``mean_pooler``), first token or the HF pooler's output
                            (``cls_pooler``), as ``cfg.pool_type`` says
    ``hook_text_embed``     ``[batch, E]`` un-normalised text embedding (after ``proj``)
    ======================  ==================================================================

    The encoder's forward is open_clip's own: ``attention_mask = tokens != pad_token_id``, the
    Hugging Face transformer, the pooler, then ``proj`` (identity, linear or MLP). The pooled
    vector passes through ``hook_pooled`` on its way into ``proj`` (a pre-hook that lives only
    during this tower's forward), so interventions on either hook change the embedding.
    ``cfg`` carries the sizes read from the Hugging Face config; ``cfg.extra`` names the model
    (``hf_model_name``, ``hf_model_type``, ``pad_token_id``, ``proj_type``).
    """

    unhooked_note = UNHOOKED_NOTE

    def __init__(self, encoder: nn.Module, model_name: Optional[str] = None):
        super().__init__()
        if not isinstance(encoder, HFTextEncoder):
            raise UnsupportedArchitectureError(
                f"HFTextTower wraps open_clip's HFTextEncoder, got {type(encoder).__name__}."
            )
        self.encoder = encoder  # the same module: parameters are shared, not copied
        self.hook_pooled = HookPoint()
        self.hook_text_embed = HookPoint()

        config = encoder.config
        names = arch_dict[config.model_type]["config_names"]
        d_model = int(getattr(config, names["width"]))
        n_heads = int(getattr(config, names["heads"]))
        n_ctx = _max_tokens(config)
        self.pad_id = int(config.pad_token_id)
        self.cfg = TowerConfig(
            tower="text",
            n_layers=int(getattr(config, names["layers"])),
            n_heads=n_heads,
            d_model=d_model,
            d_head=int(_first_attr(config, "d_kv", default=d_model // n_heads)),  # T5: d_kv
            d_mlp=int(_first_attr(config, "intermediate_size", "encoder_ffn_dim", "d_ff", default=0)),
            n_ctx=n_ctx,
            d_embed=int(encoder.output_dim),
            act_fn=str(_first_attr(config, "hidden_act", "activation_function", "dense_act_fn", default="")),
            pool_type=_pooler_name(encoder.pooler),
            context_length=n_ctx,
            vocab_size=int(config.vocab_size),
            causal=False,
            model_name=model_name,
            dtype=next(encoder.parameters()).dtype,
            extra={
                "hf_model_name": config.name_or_path,
                "hf_model_type": config.model_type,
                "pad_token_id": self.pad_id,
                "proj_type": _proj_type(encoder.proj),
            },
        )

    def _pooled_through_hook(self, module: nn.Module, args: tuple) -> tuple:
        """Forward pre-hook on ``encoder.proj``: its input (the pooled vector) goes through ``hook_pooled``."""
        return (self.hook_pooled(args[0]), *args[1:])

    def forward(self, tokens: Int[Tensor, "batch ctx"]) -> Float[Tensor, "batch E"]:
        # Run open_clip's HFTextEncoder.forward itself (exact by construction); the pre-hook is
        # removed right after, so the open_clip model run on its own is untouched.
        handle = self.encoder.proj.register_forward_pre_hook(self._pooled_through_hook)
        try:
            out = self.encoder(tokens)
        finally:
            handle.remove()
        if isinstance(out, tuple):  # output_tokens=True (CoCa): (embedding, token features)
            out = out[0]
        return self.hook_text_embed(out)


# --- offline resolution of the Hugging Face files -------------------------------------------------


def require_transformers(model_name: str) -> None:
    """Raise a [`ClipLensError`][clip_lens.ClipLensError] saying how to install ``transformers`` when open_clip lacks it."""
    import open_clip.hf_model

    if open_clip.hf_model.transformers is None:  # the condition under which open_clip itself fails
        raise ClipLensError(
            f"'{model_name}' has a Hugging Face text tower, which needs the transformers package: "
            "pip install 'clip-lens[hf]'."
        )


def hf_cache_dir() -> str:
    """The Hugging Face hub cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def missing_hf_files_message(model_name: str, repo: str, what: str = "config.json") -> str:
    """What to download (repo id, files) and where to put it, for an HF text tower used offline."""
    cache = hf_cache_dir()
    if os.path.isdir(repo):  # a local directory given through config_overrides
        return (
            f"The text tower of '{model_name}' reads the Hugging Face model from the directory {repo}, which "
            f"has no {what}: put config.json and the tokenizer files ({TOKENIZER_FILES}) of that model there "
            "(`hf download REPO_ID --include '*.json' --include '*.txt' --include '*.model' --local-dir DIR`)."
        )
    return (
        f"The text tower of '{model_name}' is the Hugging Face model '{repo}', and its {what} is neither "
        f"in a local directory nor in the Hugging Face cache ({cache}); clip_lens does not download it. "
        f"Download config.json and the tokenizer files ({TOKENIZER_FILES}) of '{repo}' (no weights: "
        f"they come from the CLIP checkpoint), e.g. on a machine with network access: "
        f"`hf download {repo} --include '*.json' --include '*.txt' --include '*.model'`, then copy the "
        f"cache folder to {cache} here; or add `--local-dir DIR` and pass "
        f"config_overrides={{'text_cfg': {{'hf_model_name': DIR, 'hf_tokenizer_name': DIR}}}}."
    )


def local_hf_config_dir(name: str) -> Optional[str]:
    """A local directory holding ``name``'s ``config.json`` (``name`` itself or its HF cache snapshot), or None.

    Looks only on disk: a directory ``name``, else the Hugging Face cache entry of the repo id
    ``name`` (``try_to_load_from_cache`` never touches the network).
    """
    if os.path.isdir(name):
        return name if (Path(name) / "config.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json", cache_dir=hf_cache_dir())
    except ValueError:  # not a valid repo id (e.g. a path that does not exist)
        return None
    return os.path.dirname(cached) if isinstance(cached, str) else None


def local_tokenizer_dir(name: str) -> Optional[str]:
    """A local directory holding the tokenizer ``name``'s vocabulary (``name`` or its HF cache snapshot), or None.

    A directory, not the repo id, is what gets passed on: with a repo id, ``huggingface_hub``
    contacts the Hub (agent detection) even when told ``local_files_only``.
    """
    if os.path.isdir(name):
        return name if any((Path(name) / f).is_file() for f in VOCABULARY_FILES) else None
    from huggingface_hub import try_to_load_from_cache

    for filename in VOCABULARY_FILES:
        try:
            cached = try_to_load_from_cache(name, filename, cache_dir=hf_cache_dir())
        except ValueError:  # not a valid repo id
            return None
        if isinstance(cached, str):
            return os.path.dirname(cached)
    return None


def prepare_hf_text_cfg(
    model_name: str, text_cfg: dict[str, Any], *, allow_download: bool = False
) -> tuple[dict[str, Any], "LazyHFTokenizer"]:
    """The ``text_cfg`` to build an HF text tower from without downloading, and its (lazy) tokenizer.

    The Hugging Face config is read from local files: ``hf_model_name`` becomes the local
    directory (given, or the HF cache snapshot) so ``transformers`` never goes online, and
    ``hf_model_pretrained`` is False (the weights come from the CLIP checkpoint, or are random).
    With ``allow_download`` (a pretrained tag, which downloads anyway) a config that is not
    cached is left to ``transformers`` to fetch; otherwise [`CheckpointNotFoundError`][clip_lens.CheckpointNotFoundError].
    """
    require_transformers(model_name)
    repo = text_cfg["hf_model_name"]
    local = local_hf_config_dir(str(repo))
    if local is None and not allow_download:
        raise CheckpointNotFoundError(missing_hf_files_message(model_name, str(repo)))
    built = {**text_cfg, "hf_model_name": local or repo, "hf_model_pretrained": False}
    tokenizer = LazyHFTokenizer(
        text_cfg.get("hf_tokenizer_name") or repo,
        context_length=text_cfg.get("context_length") or DEFAULT_CONTEXT_LENGTH,
        model_name=model_name,
        allow_download=allow_download,
        tokenizer_mode=text_cfg.get("tokenizer_mode"),
        **text_cfg.get("tokenizer_kwargs", {}),
    )
    return built, tokenizer


class LazyHFTokenizer:
    """open_clip's ``HFTokenizer`` for ``name``, built on the first call from local files only.

    Called like open_clip's tokenizers: ``tokenizer(texts) -> Int[Tensor, "batch context_length"]``
    (padded with the pad id, truncated). Missing files raise [`CheckpointNotFoundError`][clip_lens.CheckpointNotFoundError]
    naming what to download, unless ``allow_download`` lets ``transformers`` fetch them.
    """

    def __init__(
        self,
        name: str,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        model_name: Optional[str] = None,
        allow_download: bool = False,
        **kwargs: Any,
    ):
        self.name = str(name)
        self.context_length = int(context_length)
        self.model_name = model_name or self.name
        self.allow_download = allow_download
        self.kwargs = kwargs
        self._tokenizer: Optional[Callable] = None

    def _build(self) -> Callable:
        from open_clip.tokenizer import HFTokenizer

        local = local_tokenizer_dir(self.name)
        if local is not None:
            return HFTokenizer(local, context_length=self.context_length, local_files_only=True, **self.kwargs)
        if self.allow_download:  # a pretrained tag: the user is online anyway
            return HFTokenizer(self.name, context_length=self.context_length, **self.kwargs)
        raise CheckpointNotFoundError(missing_hf_files_message(self.model_name, self.name, what="tokenizer"))

    def __call__(self, texts: Union[str, Sequence[str]], context_length: Optional[int] = None) -> Int[Tensor, "batch ctx"]:
        if self._tokenizer is None:
            self._tokenizer = self._build()
        return self._tokenizer(texts, context_length=context_length)
