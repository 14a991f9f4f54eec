#!/usr/bin/env python
"""Scale benchmark: throughput and memory of HookedCLIP, decompose(), run_with_cache and collect
against raw open_clip, with a re-implementation of the TextSpan authors' decomposition as a baseline.

One run measures, per model and batch size, on the same weights and the same input batch:

  (a) raw        open_clip ``model.encode_image(x)``
  (b) hooked     ``HookedCLIP.from_open_clip(model, name).encode_image(x)``
  (c) heads      ``decompose(hooked, x, heads="all")``
  (d) tokens+D   ``decompose(hooked, x, heads="all", tokens=<last 4 layers; a convolutional tower: "all">, directions=D)``,
                 D = 1000 random unit directions ``[1000, d_embed]``
  (e) cache      ``hooked.run_with_cache(x)``: every hook point of the image tower cached, the lazy
                 ones included (attention scores/patterns, per-head results, LayerNorm scales: they
                 are computed because a caching hook is attached). ``names_filter=None`` attaches a
                 hook to every point of the model; the text tower's never fire (no text is given).
  (f) collect    ``clip_lens.collect.collect(hooked, x, <fresh empty folder>, heads="all",
                 tokens=None, chunk_size=len(x), batch_size=len(x), progress=False)``: per-head
                 terms of all layers written to disk (zstd + crc32c), the default of
                 ``clip-lens collect``. The whole call is timed, its per-call set-up included; the
                 folder is made before and removed after the timed part.
  (g) reference  the TextSpan authors' decomposition, *re-implemented from our notes*
                 (``/work/shared/papers/textspan_interpret.md`` §1; their code is not used): per
                 layer the per-(query, key, head) tensor ``[b, n, m, h, W]`` is built before any
                 sum, only query 0 (CLS) is kept and moved to the CPU, MLP outputs and ``ln_post``
                 statistics are kept the same way, then a finalize step splits ``ln_post``, projects
                 and divides by the norm (`reference_method`). CLS-pooled open_clip ViTs only; it
                 runs at ``--reference-batch`` images (default 2), as the authors' script does.

all under ``torch.inference_mode()``, and prints one table per model and batch size: images/s,
the ratio to (a) (median and min-max of paired rounds) against the targets (b >= 0.9, c >= 0.9,
d >= 0.7, f >= 0.7; the issue states them for GPU), peak memory, output size and a check column.

Precision (``--precision fp32,bf16,fp16``): the weights stay fp32; bf16/fp16 run every config,
raw open_clip included, under ``torch.autocast(device.type, dtype=...)`` entered per call. For
them the check column gives the error against fp32 of the same config on the same input,
measured in the same run: ``max_i ||y_i - y_i^fp32|| / ||y_i^fp32||`` over the images of the
embedding (and of the per-head terms for c, d, f and g).

Timing: every config is warmed up, an iteration count is calibrated so that one measurement
lasts about ``--min-time`` seconds, then ``--repeats`` rounds are run with the configs
interleaved (order rotated each round). Throughput is the median over rounds; a ratio is the
median over rounds of the paired ratio (config img/s / raw img/s in the same round), which cancels
slow drift from other load on the machine. On CUDA a config that runs out of memory is retried at
half its batch (the table shows the batch it ran at and where it ran out).

Memory:
  * CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around one call, after
    ``reset_peak_memory_stats()`` (the extra device memory one call needs, output included;
    model weights and the input are excluded). ``peak_total_mb`` in the JSON is the absolute
    ``max_memory_allocated()`` of that call (weights, input and autocast's weight copies included):
    the figure the 40 GB check of ``gpu_check.py`` uses.
  * CPU: each config runs once more in a fresh subprocess (same model, precision, batch): after a
    batch-1 warm-up (lazy library initialisation) and ``malloc_trim(0)`` (memory freed so far goes
    back to the OS, so the measured call cannot hide in it) the peak RSS is reset (``/proc/self/clear_refs``;
    if that is refused the high-water mark so far is used as baseline), one full-batch call is
    made, and ``VmHWM - VmRSS(before the call)`` is reported: the process's peak resident-memory
    growth during that call, output included, weights and input excluded.
  * ``out MB`` is the size of the tensors each call returns (the cache's tensors for (e)), and for
    (f) the bytes of the store on disk.

Only the image tower is benchmarked, so by default the text tower is built with one layer and a
64-token vocabulary (``--full-text-tower`` builds it as configured): the image tower, its weights
and its random initialisation are unchanged (it is built first). No tokenizer is used: the
directions are random unit vectors.

Examples:
  python benchmarks/bench_decompose.py                     # CPU: ViT-B-32, ViT-B-16-SigLIP; batch 8, fp32
  python benchmarks/bench_decompose.py --device cuda       # ViT-B-16 b256, ViT-L-14 b128; fp32+bf16
  python benchmarks/bench_decompose.py --models ViT-B-16 --batch 4 --precision fp32,bf16 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from peak_memory import malloc_trim, proc_status_kb, reset_peak_rss

from clip_lens.precision import PRECISIONS, autocast

CONFIGS = ["raw", "hooked", "heads", "tokens+D", "cache", "collect", "reference", "raw+compile", "heads+compile"]
COMPILED = {"raw+compile": "raw", "heads+compile": "heads"}  # run with --compile; checked like the eager config
LABELS = {
    "raw": "(a) open_clip encode_image",
    "hooked": "(b) HookedCLIP.encode_image",
    "heads": "(c) decompose heads=all",
    "tokens+D": "(d) decompose +tokens(last4) +D",
    "cache": "(e) run_with_cache, all hooks",
    "collect": "(f) collect to disk, heads=all",
    "reference": "(g) reference method (re-impl. from notes)",
    "raw+compile": "(a') torch.compile(open_clip encode_image)",
    "heads+compile": "(c') torch.compile(decompose heads=all)",
}
TARGETS = {"hooked": 0.9, "heads": 0.9, "tokens+D": 0.7, "collect": 0.7}  # stated for GPU in the issue
N_DIRECTIONS = 1000
N_TOKEN_LAYERS = 4
SUM_CHECK_TOL = 1e-4  # fp32 only (DESIGN §4); lower precisions are reported only
CPU_DEFAULT_MODELS = "ViT-B-32,ViT-B-16-SigLIP"
GPU_DEFAULT_MODELS = "ViT-B-16,ViT-L-14"
GPU_DEFAULT_BATCH = {"ViT-B-16": 256, "ViT-L-14": 128}
SMALL_TEXT_TOWER = {"layers": 1, "vocab_size": 64}  # the image benchmark never runs the text tower


# --- machine --------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device) -> dict:
    import open_clip

    info = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import clip_lens

        info["clip_lens"] = clip_lens.__version__
    except Exception:  # pragma: no cover
        pass
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        info["commit"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    return info


# --- setup ----------------------------------------------------------------------------------
def text_tower_kwargs(name: str, full_text_tower: bool) -> dict:
    """``create_model`` kwargs that shrink the text tower (unused here) to one layer and a tiny vocabulary.

    open_clip builds the image tower before the text tower, so the image weights (and their
    random initialisation under the same seed) do not change. ``{}`` for a Hugging Face text
    tower or when ``full_text_tower`` is set.
    """
    import copy

    from open_clip.factory import get_model_config

    config = None if full_text_tower else get_model_config(name)
    text_cfg = (config or {}).get("text_cfg")
    if not text_cfg or text_cfg.get("hf_model_name"):
        return {}
    text_cfg = copy.deepcopy(text_cfg)  # create_model's kwargs replace text_cfg as a whole
    text_cfg.update(SMALL_TEXT_TOWER)
    return {"text_cfg": text_cfg}


def build(name: str, device: torch.device, batch: int, seed: int = 0, full_text_tower: bool = False):
    """open_clip model (fp32 weights), HookedCLIP sharing its weights, an input batch and the directions."""
    import open_clip

    from clip_lens import HookedCLIP

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # "No pretrained weights loaded": random init is intended
        try:
            model = open_clip.create_model(name, pretrained=None, **text_tower_kwargs(name, full_text_tower))
        finally:
            logging.disable(logging.NOTSET)
    model = model.to(device=device).eval()
    hooked = HookedCLIP.from_open_clip(model, name)
    size = hooked.cfg.image_size
    # the first k images of a batch do not depend on the batch size (one stream of numbers)
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    # the width of the embedding decompose() works in: every tower's (timm head +) projection
    if hooked.visual.family == "vit":
        d_embed = hooked.visual.output_affine()[0].shape[1]
        assert hooked.cfg.d_embed in (None, d_embed), (hooked.cfg.d_embed, d_embed)
    else:  # convolutional towers: the width of their (attention pool / head) output
        d_embed = hooked.cfg.d_embed
    directions = torch.randn(N_DIRECTIONS, d_embed, generator=torch.Generator().manual_seed(seed + 2))
    directions = (directions / directions.norm(dim=-1, keepdim=True)).to(device)
    return model, hooked, images, directions


# --- (g) the reference method, re-implemented from our notes ---------------------------------
def reference_unsupported(hooked) -> Optional[str]:
    """Why `reference_method` cannot run on this model (None when it can)."""
    cfg, visual = hooked.cfg, hooked.visual
    if visual.family != "vit":
        return f"a {visual.family} tower: the reference decomposes CLS-pooled ViTs only"
    if "timm_model" in (cfg.extra or {}):
        return f"timm tower ({cfg.extra['timm_model']}): the reference re-implements open_clip's own ViT"
    if getattr(visual, "attn_pool", None) is not None or cfg.pool_type != "tok":
        return f"pool type {cfg.pool_type!r}: the reference decomposes CLS-pooled ViTs only"
    if cfg.n_prefix_tokens != 1 or getattr(visual, "proj", None) is None:
        return "needs exactly one class token and a projection"
    for block in visual.blocks:
        if block.attn.ln_inner is not None or block.ln1_post is not None:
            return "normalisation between the heads and the residual stream (not in the reference)"
    return None


def reference_method(hooked, images: torch.Tensor):
    """The computation pattern of Gandelsman et al.'s decomposition (``attn_method="head"``), written
    from the description in ``textspan_interpret.md`` §1 with our hooks; not their code.

    Forward pass with hooks; per layer ``l``:
      * attention: from ``hook_v`` ``[b, m, h, d]`` and ``hook_pattern`` ``[b, h, n, m]`` the
        per-(query, key, head) tensor ``post[b, n, m, h, W] = α[b, h, n, m] · (v[b, m, h] W_O^h)
        + b_O / (m·h)`` is built *before any sum* (as the reference does), then only query 0 (CLS) is
        kept, ``[b, m, h, W]``, and moved to the CPU. Of the two orders of the product, the
        cheaper one is used (``v W_O`` per key first, then one broadcast multiply; the other,
        ``α v`` per (query, key) first, costs ``n·d`` times more FLOPs).
      * ``hook_mlp_out`` at CLS and the ``ln_pre`` output (the embedding term) to the CPU;
      * ``ln_post``'s statistics: ``μ`` and ``sqrt(var + eps)`` of the final CLS residual, ``[b, 1]``.
    Finalize (on the model's device: the CPU tensors are moved back; where the authors run it is not
    in our notes): each component ``c`` maps to ``P^T[γ⊙(c − μ/K)/σ + β/K] / ||y||`` with
    ``K = (2L+1)·N·H`` for token-head terms and ``K = 2L+1`` for the ``L+1`` MLP terms (index 0 =
    embedding), so that all pieces sum to ``y / ||y||``.

    Returns ``(attentions [b, L, N, H, D], mlps [b, L+1, D], embedding [b, D])``, the pieces on the
    model's device and the forward pass's (un-normalised) embedding.
    """
    visual = hooked.visual
    cfg = visual.cfg
    n_layers, n_heads = cfg.n_layers, cfg.n_heads
    device = images.device
    held: dict = {}
    attentions: list = [None] * n_layers
    mlps: list = [None] * (n_layers + 1)
    stats: dict = {}

    def keep_v(layer):
        def hook(v, hook):
            held[layer] = v

        return hook

    def attention(layer):
        attn = visual.blocks[layer].attn

        def hook(pattern, hook):
            v = held.pop(layer)  # [b, m, h, d]
            n_keys = pattern.shape[-1]
            ov = torch.einsum("bmhd,hdw->bmhw", v, attn.W_O)  # each key's value through W_O^h
            post = pattern.to(ov.dtype).permute(0, 2, 3, 1).unsqueeze(-1) * ov.unsqueeze(1)  # [b, n, m, h, W]
            post = post + attn.b_O.to(post.dtype) / (n_keys * n_heads)
            attentions[layer] = post[:, 0].to("cpu", copy=True)  # query 0 only, to the CPU every layer
            del post

        return hook

    def keep_cls(index):
        def hook(x, hook):
            mlps[index] = x[:, 0].to("cpu", copy=True)

        return hook

    def ln_post_stats(x, hook):
        cls = x[:, 0].float()
        stats["mean"] = cls.mean(-1, keepdim=True).to("cpu", copy=True)
        stats["sqrt_var"] = (cls.var(-1, keepdim=True, unbiased=False) + visual.ln_post.eps).sqrt().to("cpu", copy=True)

    fwd_hooks = [("blocks.0.hook_resid_pre", keep_cls(0)),
                 (f"blocks.{n_layers - 1}.hook_resid_post", ln_post_stats)]
    for layer in range(n_layers):
        fwd_hooks += [(f"blocks.{layer}.attn.hook_v", keep_v(layer)),
                      (f"blocks.{layer}.attn.hook_pattern", attention(layer)),
                      (f"blocks.{layer}.hook_mlp_out", keep_cls(layer + 1))]
    with torch.no_grad(), hooked.hooks(fwd_hooks=fwd_hooks):
        embedding = visual(hooked.check_images(images))

    # finalize
    with torch.no_grad():
        attn = torch.stack(attentions, 1).to(device)  # [b, L, N, H, W]
        mlp = torch.stack(mlps, 1).to(device)  # [b, L+1, W]
        mean, sigma = stats["mean"].to(device), stats["sqrt_var"].to(device)  # [b, 1]
        n_tokens = attn.shape[2]
        gamma, beta = visual.ln_post.weight, visual.ln_post.b
        norm = embedding.float().norm(dim=-1)

        def split(c, k):
            shape = (-1,) + (1,) * (c.ndim - 1)
            piece = ((c - mean.view(shape) / k) / sigma.view(shape) * gamma + beta / k) @ visual.proj
            return piece / norm.view(shape)

        attn = split(attn, (2 * n_layers + 1) * n_tokens * n_heads)  # [b, L, N, H, D]
        mlp = split(mlp, 2 * n_layers + 1)  # [b, L+1, D]
    return attn, mlp, embedding


# --- the configs ----------------------------------------------------------------------------
@dataclass
class Config:
    """One timed call. ``scratch``: the call takes a fresh empty folder (made and removed untimed)."""

    key: str
    fn: Callable[..., Any]
    batch: int
    scratch: bool = False
    oom_at: list = field(default_factory=list)

    def call(self, x: torch.Tensor, folder: Optional[str] = None):
        return self.fn(x, folder) if self.scratch else self.fn(x)


def make_configs(model, hooked, directions, batch: int, args) -> dict[str, Config]:
    from clip_lens.collect import collect
    from clip_lens import decompose

    # a ViT's last 4 layers; a convolutional tower's per-position terms ("all": its attention pool, every
    # ConvNeXt block, a FastViT's final map)
    token_layers = (list(range(hooked.cfg.n_layers - N_TOKEN_LAYERS, hooked.cfg.n_layers))
                    if hooked.visual.family == "vit" else "all")
    configs = {
        "raw": Config("raw", lambda x: model.encode_image(x), batch),
        "hooked": Config("hooked", lambda x: hooked.encode_image(x), batch),
        "heads": Config("heads", lambda x: decompose(hooked, x, heads="all"), batch),
        "tokens+D": Config("tokens+D", lambda x: decompose(hooked, x, heads="all", tokens=token_layers,
                                                           directions=directions), batch),
        "cache": Config("cache", lambda x: hooked.run_with_cache(x), batch),
        "collect": Config("collect", lambda x, folder: collect(hooked, x, folder, heads="all", tokens=None,
                                                               chunk_size=len(x), batch_size=len(x),
                                                               progress=False), batch, scratch=True),
        "reference": Config("reference", lambda x: reference_method(hooked, x), min(batch, args.reference_batch)),
    }
    if args.compile:  # compiled on the first (warm-up) call; the timing excludes it
        compiled_raw = torch.compile(model.encode_image)
        compiled_heads = torch.compile(lambda x: decompose(hooked, x, heads="all"))
        configs["raw+compile"] = Config("raw+compile", lambda x: compiled_raw(x), batch)
        configs["heads+compile"] = Config("heads+compile", lambda x: compiled_heads(x), batch)
    return {key: configs[key] for key in args.config_list}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def scratch_folder(args) -> str:
    return tempfile.mkdtemp(prefix="bench_collect_", dir=args.tmpdir)


def folder_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def output_bytes(out) -> int:
    """Bytes of the tensors a call returns (a cache's tensors; a dataclass's tensor fields)."""
    if isinstance(out, torch.Tensor):
        return out.numel() * out.element_size()
    if isinstance(out, (tuple, list)):
        return sum(output_bytes(o) for o in out)
    if isinstance(out, dict):
        return sum(output_bytes(o) for o in out.values())
    if hasattr(out, "cache_dict"):
        return output_bytes(out.cache_dict)
    if dataclasses.is_dataclass(out):
        return sum(output_bytes(getattr(out, f.name)) for f in dataclasses.fields(out))
    return 0


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max_i ||a_i - b_i|| / ||b_i||`` over the first axis (the images)."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    return ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max().item()


# --- memory ---------------------------------------------------------------------------------
def cpu_peak_child(args: argparse.Namespace) -> None:
    """Subprocess entry: peak RSS growth of one call of one config (printed as JSON)."""
    device = torch.device("cpu")
    model, hooked, images, directions = build(args.models, device, args.batch, full_text_tower=args.full_text_tower)
    args.config_list = [args.memory_child]
    args.reference_batch = args.batch
    cfg = make_configs(model, hooked, directions, args.batch, args)[args.memory_child]
    folder = scratch_folder(args) if cfg.scratch else None
    try:
        with torch.inference_mode():
            warm = scratch_folder(args) if cfg.scratch else None
            with autocast(device, args.precision):
                cfg.call(images[:1], warm)  # lazy initialisation (thread pools, kernels) outside the measurement
            if warm:
                shutil.rmtree(warm, ignore_errors=True)
            trimmed = malloc_trim()
            reset = reset_peak_rss()
            before = proc_status_kb("VmRSS")
            baseline = before if reset else proc_status_kb("VmHWM")
            with autocast(device, args.precision):
                out = cfg.call(images, folder)
            peak = proc_status_kb("VmHWM")
        result = {
            "peak_mb": None if None in (peak, baseline) else max(peak - baseline, 0) / 1024,
            "method": ("VmHWM-VmRSS after clear_refs" if reset else "VmHWM growth (no reset)")
            + (" and malloc_trim" if trimmed else ""),
            "out_bytes": folder_bytes(folder) if cfg.scratch else output_bytes(out),
        }
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    print("@@MEM " + json.dumps(result))


def cpu_peak_memory(name: str, precision: str, batch: int, config: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--models", name, "--precision", precision,
           "--batch", str(batch), "--device", "cpu", "--memory-child", config,
           "--threads", str(torch.get_num_threads())] + (["--full-text-tower"] if args.full_text_tower else []) \
        + (["--tmpdir", args.tmpdir] if args.tmpdir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@MEM "):
            return json.loads(line[len("@@MEM "):])
    return {"peak_mb": None, "method": f"subprocess failed: {proc.stderr.strip()[-300:]}"}


def cuda_peak_memory(cfg: Config, images: torch.Tensor, device: torch.device, precision: str, args) -> dict:
    folder = scratch_folder(args) if cfg.scratch else None
    try:
        sync(device)
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast(device, precision):
            out = cfg.call(images[:cfg.batch], folder)
        sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        result = {"peak_mb": (peak - base) / 2**20, "peak_total_mb": peak / 2**20,
                  "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
                  "method": "cuda max_memory_allocated - allocated"}
        del out
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    return result


# --- one call: outputs, checks, comparable summaries -----------------------------------------
def store_arrays(folder: str) -> dict[str, torch.Tensor]:
    from clip_lens.collect import Store

    store = Store.open(folder)
    return {name: store.read(name) for name in store.arrays if name not in ("labels",)}


def inspect(key: str, out, folder: Optional[str], raw: Optional[torch.Tensor], directions) -> tuple[dict, dict, int]:
    """``(checks, summary, out_bytes)`` of one output. ``summary``: the CPU tensors compared across
    precisions (``embedding``, and ``heads`` where the config has per-head terms)."""
    checks: dict = {}
    summary: dict = {}
    if key == "collect":
        arrays = store_arrays(folder)
        total = sum(arrays[name] for name in ("embed", "bias", "pooler_mlp", "feature_map") if name in arrays)
        total = total + sum(arrays[name].sum(1) for name in ("attn", "mlp", "blocks") if name in arrays)
        checks["sum_check"] = rel_err(total, arrays["embedding"])
        summary = {"embedding": arrays["embedding"], "heads": arrays.get("heads")}
        if raw is not None:
            n = len(arrays["embedding"])
            checks["vs_raw"] = rel_err(arrays["embedding"], torch.nn.functional.normalize(raw[:n].float(), dim=-1))
        return checks, summary, folder_bytes(folder)
    key = COMPILED.get(key, key)
    if key in ("raw", "hooked"):
        summary = {"embedding": out}
    elif key in ("heads", "tokens+D"):
        checks["sum_check"] = out.relative_error().float().max().item()
        summary = {"embedding": out.embedding, "heads": out.heads}
        if key == "tokens+D" and out.family != "vit":  # a convolutional tower: per-position terms
            checks["positions_shape"] = list(out.positions.shape)
        elif key == "tokens+D":
            tl = out.token_layers
            heads_d = out.heads[:, [out.head_layers.index(l) for l in tl]].float()
            checks["tokens_vs_heads"] = ((out.tokens.float().sum(3) - heads_d).norm() / heads_d.norm()).item()
            checks["tokens_shape"] = list(out.tokens.shape)
    elif key == "cache":
        cache = out[1]
        summary = {"embedding": cache["hook_image_embed"]}
        checks["n_cached"] = len(cache.cache_dict)
    elif key == "reference":
        attn, mlp, embedding = out
        total = attn.sum((1, 2, 3)) + mlp.sum(1)
        checks["sum_check"] = rel_err(total, torch.nn.functional.normalize(embedding.float(), dim=-1))
        summary = {"embedding": total, "heads": attn.sum(2)}
        if raw is not None:
            checks["vs_raw"] = rel_err(total, torch.nn.functional.normalize(raw[:len(total)].float(), dim=-1))
    if raw is not None and key in ("hooked", "heads", "tokens+D", "cache"):
        n = len(summary["embedding"])
        reference = raw[:n].float()
        if key == "tokens+D":
            reference = reference @ directions.float().T
        checks["vs_raw"] = rel_err(summary["embedding"], reference)
    summary = {k: v.detach().float().cpu() for k, v in summary.items() if v is not None}
    return checks, summary, output_bytes(out)


def run_once(cfg: Config, images: torch.Tensor, device: torch.device, precision: str, raw, directions, args):
    """One call of ``cfg`` (its batch halved on CUDA out-of-memory) -> ``(checks, summary, out_bytes)``."""
    while True:
        folder = scratch_folder(args) if cfg.scratch else None
        try:
            with autocast(device, precision):
                out = cfg.call(images[:cfg.batch], folder)
            sync(device)
            return inspect(cfg.key, out, folder, raw, directions)
        except torch.cuda.OutOfMemoryError:
            if device.type != "cuda" or cfg.batch == 1:
                raise
            out = None
            cfg.oom_at.append(cfg.batch)
            cfg.batch //= 2
            torch.cuda.empty_cache()
            print(f"  {cfg.key}: CUDA out of memory at batch {cfg.oom_at[-1]}, retrying at {cfg.batch}", flush=True)
        finally:
            if folder:
                shutil.rmtree(folder, ignore_errors=True)


# --- timing ---------------------------------------------------------------------------------
def time_calls(cfg: Config, images: torch.Tensor, iters: int, device: torch.device, precision: str, args) -> float:
    x = images[:cfg.batch]
    if not cfg.scratch:
        sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            with autocast(device, precision):
                cfg.call(x)  # result dropped at once: no two outputs alive together
        sync(device)
        return time.perf_counter() - start
    total = 0.0
    for _ in range(iters):
        folder = scratch_folder(args)
        try:
            sync(device)
            start = time.perf_counter()
            with autocast(device, precision):
                cfg.call(x, folder)
            sync(device)
            total += time.perf_counter() - start
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return total


def bench_precision(name: str, precision: str, batch: int, device: torch.device, built, fp32_summaries: dict,
                    args) -> dict:
    """Every config of one model, batch and precision: checks, paired rounds, memory."""
    model, hooked, images, directions = built
    configs = make_configs(model, hooked, directions, batch, args)
    result: dict = {"precision": precision, "configs": {}}
    print(f"-- {name} batch {batch} {precision}"
          + ("" if precision == "fp32" else f" (torch.autocast({device.type!r}, {PRECISIONS[precision]}), fp32 weights)"),
          flush=True)

    with torch.inference_mode():
        # correctness (also the first warm-up): the decompositions are exact, describe the same forward
        # as open_clip, and (below fp32) how far each config is from its fp32 result
        raw = None
        for key, cfg in list(configs.items()):
            entry = result["configs"].setdefault(key, {})
            try:
                if key == "reference" and (why := reference_unsupported(hooked)):
                    raise NotImplementedError(why)
                if key == "raw":
                    with autocast(device, precision):
                        raw = model.encode_image(images).float()
                checks, summary, nbytes = run_once(cfg, images, device, precision, raw, directions, args)
            except NotImplementedError as exc:
                entry["skipped"] = str(exc)
                print(f"  {LABELS[key]}: skipped: {exc}", flush=True)
                del configs[key]
                continue
            except Exception as exc:  # one failing config must not cost the other figures (GPU runs are one shot)
                if key == "raw":
                    raise
                entry["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"  {LABELS[key]}: FAILED {entry['error']}", flush=True)
                del configs[key]
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            entry.update(checks=checks, out_bytes=nbytes, batch=cfg.batch, oom_at=cfg.oom_at)
            if precision == "fp32":
                fp32_summaries[key] = summary
            else:
                try:
                    if key not in fp32_summaries:  # fp32 not among --precision: its result is computed here
                        _, fp32_summaries[key], _ = run_once(cfg, images, device, "fp32", None, directions, args)
                    ref = fp32_summaries[key]
                    entry["vs_fp32"] = {k: rel_err(v[:min(len(v), len(ref[k]))], ref[k][:min(len(v), len(ref[k]))])
                                        for k, v in summary.items() if k in ref}
                except Exception as exc:
                    entry["vs_fp32_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        del raw

        key_fns = list(configs)

        def timed(key: str, iters: int) -> Optional[float]:
            """Seconds for ``iters`` calls; None (and the config dropped) if it runs out of CUDA memory
            here although its check call fitted (fragmentation)."""
            try:
                return time_calls(configs[key], images, iters, device, precision, args)
            except torch.cuda.OutOfMemoryError as exc:
                if key == "raw":
                    raise
                result["configs"][key]["error"] = f"CUDA out of memory while timing: {str(exc)[:200]}"
                print(f"  {key}: {result['configs'][key]['error']}", flush=True)
                key_fns.remove(key)
                torch.cuda.empty_cache()
                return None

        # warm-up + calibration of the iteration count per config
        iters = {}
        for key in list(key_fns):
            for _ in range(max(args.warmup - 1, 0)):
                timed(key, 1)
            t = timed(key, 1) if key in key_fns else None
            if t is not None:
                iters[key] = max(1, round(args.min_time / max(t, 1e-6)))

        per_round = {key: [] for key in key_fns}
        for r in range(args.repeats):
            order = key_fns[r % len(key_fns):] + key_fns[:r % len(key_fns)]
            for key in order:
                elapsed = timed(key, iters[key])
                if elapsed is not None:
                    per_round[key].append(configs[key].batch * iters[key] / elapsed)
            print(f"  round {r + 1}/{args.repeats}: "
                  + "  ".join(f"{k} {per_round[k][-1]:.1f}" for k in key_fns) + " img/s", flush=True)

        for key in key_fns:
            thr = per_round[key]
            entry = result["configs"][key]
            entry.update(images_per_s=statistics.median(thr), per_round=thr, iters_per_round=iters[key],
                         ms_per_batch=1000 * configs[key].batch / statistics.median(thr))
            if key != "raw":
                ratios = [x / a for x, a in zip(thr, per_round["raw"])]
                entry["ratio"] = statistics.median(ratios)
                entry["ratio_range"] = [min(ratios), max(ratios)]
                if key in TARGETS:
                    entry["target"] = TARGETS[key]
                    entry["pass"] = entry["ratio"] >= TARGETS[key]

        if not args.no_memory and device.type == "cuda":
            for key in key_fns:
                try:
                    result["configs"][key]["memory"] = cuda_peak_memory(configs[key], images, device, precision, args)
                except torch.cuda.OutOfMemoryError as exc:
                    result["configs"][key]["memory"] = {"peak_mb": None, "method": f"OOM: {str(exc)[:200]}"}
                    torch.cuda.empty_cache()

    if not args.no_memory and device.type == "cpu":
        for key in key_fns:
            result["configs"][key]["memory"] = cpu_peak_memory(name, precision, configs[key].batch, key, args)
    return result


def bench_model(name: str, batch: int, precisions: list[str], device: torch.device, args,
                rows: Optional[list] = None, info: Optional[dict] = None) -> dict:
    """All precisions of one model and batch size; the row is appended to ``rows`` at once and the
    JSON rewritten after every precision (a run cut short keeps what it measured)."""
    built = build(name, device, batch, full_text_tower=args.full_text_tower)
    model, hooked, images, directions = built
    tcfg = hooked.cfg
    family = hooked.visual.family
    tower = (f"{family} tower" if family != "vit" else
             f"timm {tcfg.extra.get('timm_model')}" if "timm_model" in (tcfg.extra or {}) else "open_clip ViT")
    d_embed = directions.shape[1]
    row: dict = {"model": name, "batch": batch, "device": str(device), "tower": tower,
                 "n_layers": tcfg.n_layers, "n_heads": tcfg.n_heads, "n_ctx": tcfg.n_ctx,
                 "n_prefix_tokens": tcfg.n_prefix_tokens, "pool_type": tcfg.pool_type, "d_embed": d_embed,
                 "reference_batch": min(batch, args.reference_batch),
                 "text_tower": "as configured" if args.full_text_tower or not text_tower_kwargs(name, False)
                 else f"shrunk {SMALL_TEXT_TOWER}", "precisions": {}}
    if rows is not None:
        rows.append(row)
    print(f"\n== {name}  batch {batch}  on {device} ({tower}: {tcfg.n_layers} layers x {tcfg.n_heads} heads, "
          f"{tcfg.n_ctx} tokens of which {tcfg.n_prefix_tokens} prefix, pool {tcfg.pool_type}, d_embed {d_embed}; "
          f"tokens= {'last %d layers' % N_TOKEN_LAYERS if family == 'vit' else 'all'}, D = [{N_DIRECTIONS}, {d_embed}])", flush=True)
    if "collect" in args.config_list:
        try:  # the per-call set-up of collect that a real run pays once per job, not per batch
            from clip_lens.collect import weights_fingerprint

            sync(device)
            start = time.perf_counter()
            weights_fingerprint(hooked)
            sync(device)
            row["collect_fingerprint_ms"] = 1000 * (time.perf_counter() - start)
        except Exception:  # pragma: no cover - collect's internals may change
            row["collect_fingerprint_ms"] = None
    fp32_summaries: dict = {}
    for precision in sorted(precisions, key=lambda p: p != "fp32"):  # fp32 first: the others compare with it
        row["precisions"][precision] = bench_precision(name, precision, batch, device, built, fp32_summaries, args)
        if args.json and rows is not None:
            write_json(args.json, info, args, rows)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(row)
    return row


# --- report ---------------------------------------------------------------------------------
def fmt_mb(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def check_text(entry: dict, precision: str) -> str:
    c = entry.get("checks", {})
    parts = []
    if "sum_check" in c:
        parts.append(f"sum {c['sum_check']:.1e}")
    if "vs_raw" in c:
        parts.append(f"vs(a) {c['vs_raw']:.1e}")
    if precision != "fp32" and entry.get("vs_fp32"):
        names = {"embedding": "emb", "heads": "heads"}
        parts.insert(0, "vs fp32 " + " ".join(f"{names.get(k, k)} {v:.1e}" for k, v in entry["vs_fp32"].items())
                     + (" |" if parts else ""))
    return " ".join(parts)


def print_table(row: dict) -> None:
    print(f"\n### {row['model']} batch {row['batch']} on {row['device']} ({row['tower']}, text tower {row['text_tower']})")
    head = (f"   {'config':42s} {'prec':4s} {'batch':>5s} {'img/s':>9s} {'ratio':>6s} {'(min-max)':>11s} "
            f"{'target':>10s} {'peak MB':>9s} {'out MB':>9s}  check")
    print(head)
    print("   " + "-" * (len(head) - 3 + 24))
    for key in CONFIGS:
        for precision, res in row["precisions"].items():
            e = res["configs"].get(key)
            if e is None:
                continue
            label = LABELS[key]
            if "skipped" in e or "error" in e:
                why = f"skipped: {e['skipped']}" if "skipped" in e else f"FAILED: {e['error']}"
                print(f"   {label:42s} {precision:4s} {why}")
                continue
            ratio = spread = target = ""
            if key != "raw":
                ratio = f"{e['ratio']:.2f}"
                spread = f"{e['ratio_range'][0]:.2f}-{e['ratio_range'][1]:.2f}"
            if "target" in e:
                target = f">={e['target']:.1f} " + ("ok" if e["pass"] else "MISS")
            batch = f"{e['batch']}" + (f"*" if e.get("oom_at") else "")
            mem = e.get("memory", {})
            out_mb = e.get("out_bytes")
            print(f"   {label:42s} {precision:4s} {batch:>5s} {e['images_per_s']:9.2f} {ratio:>6s} {spread:>11s} "
                  f"{target:>10s} {fmt_mb(mem.get('peak_mb')):>9s} "
                  f"{'n/a' if out_mb is None else f'{out_mb / 2**20:,.1f}':>9s}  {check_text(e, precision)}")
    notes = []
    for precision, res in row["precisions"].items():
        for key, e in res["configs"].items():
            if e.get("oom_at"):
                notes.append(f"* {key} {precision}: CUDA out of memory at batch {', '.join(map(str, e['oom_at']))}")
            if key == "tokens+D" and "positions_shape" in e.get("checks", {}):
                notes.append(f"(d) {precision}: per-position terms {tuple(e['checks']['positions_shape'])}")
            elif key == "tokens+D" and "checks" in e:
                notes.append(f"(d) {precision}: tokens {tuple(e['checks']['tokens_shape'])}, tokens.sum(token) vs heads "
                             f"{e['checks']['tokens_vs_heads']:.1e}")
            if key == "cache" and "checks" in e and precision == next(iter(row["precisions"])):
                notes.append(f"(e): {e['checks']['n_cached']} hook points cached")
    if row.get("collect_fingerprint_ms") is not None:
        notes.append(f"(f) includes collect's per-call set-up, e.g. the weights fingerprint: "
                     f"{row['collect_fingerprint_ms']:.0f} ms per call (paid once per job in a real run)")
    fp32 = row["precisions"].get("fp32", {}).get("configs", {})
    sums = [e["checks"]["sum_check"] for e in fp32.values() if "sum_check" in e.get("checks", {})]
    if sums:
        notes.append(f"fp32 sum checks: max {max(sums):.1e} ({'ok' if max(sums) <= SUM_CHECK_TOL else 'MISS'}, tol "
                     f"{SUM_CHECK_TOL:g}); below fp32 'vs fp32' = max over images of ||y - y_fp32|| / ||y_fp32|| "
                     "(emb = embedding, heads = per-head terms)")
    for note in notes:
        print("   " + note, flush=True)


def print_summary(info: dict, rows: list[dict], args) -> None:
    print("\n" + "=" * 110)
    print(f"Machine: {info['cpu']} ({info['cpu_count']} logical CPUs), torch {info['torch']} "
          f"({info['torch_threads']} threads), open_clip {info['open_clip']}, python {info['python']}, "
          f"commit {info.get('commit')}"
          + (f", GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""))
    if info.get("loadavg_start") is not None:
        print(f"Load average (1/5/15 min) at start {'/'.join(f'{x:.2f}' for x in info['loadavg_start'])}, "
              f"at end {'/'.join(f'{x:.2f}' for x in info['loadavg_end'])} (other processes share these CPUs)")
    print(f"Device {info['device']}; torch.inference_mode(); {args.repeats} interleaved rounds, "
          f"~{args.min_time:g}s per measurement, {args.warmup} warm-up calls; img/s = median over rounds, "
          f"ratio = median of per-round paired ratios vs (a) of the same precision (min-max over rounds)")
    mem_note = ("CUDA max_memory_allocated growth during one call" if info["device"].startswith("cuda")
                else "peak RSS growth during one call in a fresh subprocess (weights+input excluded)")
    print(f"peak MB = {mem_note}; out MB = size of the returned tensors ((e): the cache; (f): the store on disk)")
    print("targets (stated for GPU): hooked >= 0.9x, heads >= 0.9x, tokens+D >= 0.7x, collect >= 0.7x of raw "
          "open_clip img/s; (g) and (e) have none")
    for row in rows:
        print_table(row)


# --- main -----------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=None,
                   help=f"comma-separated open_clip names (default: {CPU_DEFAULT_MODELS} on CPU; "
                        f"{GPU_DEFAULT_MODELS} on CUDA)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size for every model (default: 8 on CPU; 256 for ViT-B-16, 128 for ViT-L-14 on CUDA)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:i]")
    p.add_argument("--precision", default=None,
                   help="comma-separated from fp32,bf16,fp16: fp32 weights, bf16/fp16 under torch.autocast "
                        "(default: fp32 on CPU, fp32,bf16 on CUDA)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (raw is always run)")
    p.add_argument("--no-reference", action="store_true", help="skip (g), the reference method (slow, memory hungry)")
    p.add_argument("--reference-batch", type=int, default=2,
                   help="images per call of (g), at most --batch (default 2, the authors' batch)")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd open_clip encode_image (a') and decompose heads=all (c')")
    p.add_argument("--tmpdir", default=None, help="where (f) writes its stores (default: the system temp folder)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads(N) (default: leave torch's default, %d here)" % torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds (median is reported)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per config before timing (the check call counts)")
    p.add_argument("--min-time", type=float, default=None,
                   help="target seconds per measurement; sets iterations per round (default 1.0 CPU, 0.5 CUDA)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--full-text-tower", action="store_true",
                   help="build the text tower as configured (default: 1 layer, 64-token vocabulary; unused here)")
    p.add_argument("--json", metavar="OUT", help="write all results to this JSON file")
    p.add_argument("--memory-child", choices=CONFIGS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    chosen = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(chosen) - set(CONFIGS))
    if unknown:
        p.error(f"unknown --configs {unknown}; choose from {', '.join(CONFIGS)}")
    if args.no_reference:
        chosen = [c for c in chosen if c != "reference"]
    if args.compile:
        chosen += list(COMPILED)
    args.config_list = [c for c in CONFIGS if c in chosen and (c not in COMPILED or args.compile) or c == "raw"]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        args.precision = args.precision or "fp32"
        cpu_peak_child(args)
        return

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda requested but torch.cuda.is_available() is False")
    on_gpu = device.type == "cuda"
    models = (args.models or (GPU_DEFAULT_MODELS if on_gpu else CPU_DEFAULT_MODELS)).split(",")
    precisions = (args.precision or ("fp32,bf16" if on_gpu else "fp32")).split(",")
    for d in precisions:
        if d not in PRECISIONS:
            sys.exit(f"unknown --precision {d!r}; choose from {', '.join(PRECISIONS)}")
    if args.min_time is None:
        args.min_time = 0.5 if on_gpu else 1.0

    info = machine_info(device)
    print(f"bench_decompose: {info}", flush=True)
    rows = []
    for name in models:
        batch = args.batch or (GPU_DEFAULT_BATCH.get(name, 128) if on_gpu else 8)
        bench_model(name, batch, precisions, device, args, rows, info)
        if on_gpu:
            torch.cuda.empty_cache()

    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = list(os.getloadavg())
    print_summary(info, rows, args)
    if args.json:
        write_json(args.json, info, args, rows)
        print(f"wrote {args.json}")


def write_json(path: str, info: dict, args, rows: list[dict]) -> None:
    """Written to a temporary file, then renamed: a run killed mid-write leaves the previous JSON."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"machine": info, "args": vars(args), "targets": TARGETS, "results": rows}, f, indent=2)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
