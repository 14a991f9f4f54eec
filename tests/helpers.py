"""Small seeded models shared by the test suite (offline: random init, no downloads)."""

from __future__ import annotations

import io
import json
import tarfile
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional

import open_clip
import torch

from clip_lens import HookedCLIP
from clip_lens.loading import model_config
from clip_lens.loading import timm_create_kwargs as timm_kwargs

# Same architecture features, fewer layers/narrower: keeps the suite fast on 2 CPU cores.
SHRINK = {"vision_cfg": {"layers": 2}, "text_cfg": {"layers": 2}}


def build_open_clip(
    name: str, overrides: Optional[dict[str, Any]] = None, seed: int = 0, timm: Optional[dict[str, Any]] = None
) -> torch.nn.Module:
    """A seeded random-init open_clip model of ``name`` with ``overrides`` merged into its config
    (and ``timm`` passed to timm for a timm image tower, e.g. ``{"depth": 2}``)."""
    overrides = SHRINK if overrides is None else overrides
    torch.manual_seed(seed)
    config = model_config(name, overrides)
    with timm_kwargs(**(timm or {})):
        model = open_clip.create_model(name, pretrained=None, **{k: v for k, v in config.items() if k in overrides})
    return model.eval()


def randomize_vectors(model: torch.nn.Module, seed: int = 1) -> None:
    """Give every 1-d parameter (biases, LN affine, LayerScale, class embedding) random values.

    open_clip zero-inits biases, sets LayerNorm to (1, 0) and LayerScale to 1e-4, which would hide
    a dropped bias or gamma; random values make every term matter.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 1 or name in ("logit_scale", "logit_bias"):
                continue
            noise = 0.1 * torch.randn(p.shape, generator=g)
            if name.endswith(("ls_1.gamma", "ls_2.gamma", "ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                p.copy_(0.5 + noise)
            else:
                p.add_(noise)


def randomize_batch_norms(model: torch.nn.Module, seed: int = 2) -> None:
    """Give every BatchNorm's running statistics random values (means ~N(0, 0.1²), variances in
    [0.5, 1.5]): fresh ones are (0, 1), which would hide a dropped or misplaced normalisation."""
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            module.running_mean.copy_(0.1 * torch.randn(module.running_mean.shape, generator=g))
            module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))


def hooked_pair(name: str, overrides: Optional[dict[str, Any]] = None, seed: int = 0, randomize: bool = False,
                timm: Optional[dict[str, Any]] = None):
    """``(open_clip_model, HookedCLIP)`` sharing parameters (``randomize``: see :func:`randomize_vectors`)."""
    model = build_open_clip(name, overrides, seed, timm)
    if randomize:
        randomize_vectors(model, seed + 1)
    return model, HookedCLIP.from_open_clip(model, name)


def random_images(model: HookedCLIP, batch: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.cfg.image_size, generator=g)


def random_tokens(model: HookedCLIP, batch: int = 2, length: int = 9, seed: int = 0) -> torch.Tensor:
    """Token ids shaped like real tokenizer output: SOT, words, EOT (the largest id), padding."""
    g = torch.Generator().manual_seed(seed)
    ctx, vocab = model.text.cfg.context_length, model.text.cfg.vocab_size
    tokens = torch.zeros(batch, ctx, dtype=torch.long)
    tokens[:, 0] = vocab - 2
    tokens[:, 1:length] = torch.randint(1, vocab - 2, (batch, length - 1), generator=g)
    tokens[:, length] = vocab - 1
    return tokens


@contextmanager
def serving(server):
    """Run an http.server-style ``server`` in a daemon thread for the ``with`` block, then stop and close it."""
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def ok(runner, args):
    """Run a CLI command that must succeed (exit status 0)."""
    from clip_lens.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def one_line_error(runner, args, *expected: str) -> str:
    """Run a failing CLI command: exit status 2, no traceback, one 'error:' line holding ``expected``."""
    from clip_lens.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def call(server, path, body=None, data=None, headers=None):
    """``(status, JSON)`` of a GET (no body) or POST to ``path``."""
    if body is not None:
        data = json.dumps(body).encode()
    request = urllib.request.Request(server.url + path.lstrip("/"), data,
                                     {"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def write_shards(folder, images, per_shard: int, labels=None, fmt: str = "png") -> list:
    """WebDataset tar shards ``folder/shard-000000.tar`` … holding ``per_shard`` samples each.

    Sample ``i`` has the key ``f"{i:06d}"``, its image as ``KEY.<fmt>`` (a PIL image is encoded in
    ``fmt``; bytes are stored as they are) and, when ``labels`` is given, ``KEY.cls`` holding
    ``str(labels[i])``. Returns the shard paths in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def add(tar, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime = len(data), 0
        tar.addfile(info, io.BytesIO(data))

    paths = []
    for first in range(0, len(images), per_shard):
        path = folder / f"shard-{first // per_shard:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(first, min(first + per_shard, len(images))):
                image = images[i]
                if not isinstance(image, bytes):
                    buffer = io.BytesIO()
                    image.save(buffer, format="JPEG" if fmt.lower() in ("jpg", "jpeg") else fmt.upper())
                    image = buffer.getvalue()
                add(tar, f"{i:06d}.{fmt}", image)
                if labels is not None:
                    add(tar, f"{i:06d}.cls", str(labels[i]).encode())
        paths.append(path)
    return paths


def store_files(folder) -> dict[str, bytes]:
    """Every file of a collected store folder by relative path, as bytes, with the store's random
    ``identity`` and the checksums that cover it (group metadata, markers) replaced by placeholders,
    so two runs of the same collect compare equal byte for byte. A checksum that does not match its
    content is left as it is, so damage still shows."""
    import json
    from pathlib import Path

    from clip_lens.collect import _checksum

    folder = Path(folder)
    group = json.loads((folder / "zarr.json").read_bytes())["attributes"]
    identity = group.get("identity")
    found = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name, data = str(path.relative_to(folder)), path.read_bytes()
        if name == "zarr.json" or name.startswith("done/"):
            try:
                content = json.loads(data)
                content = content["attributes"] if name == "zarr.json" else content
                if content["checksum"] == _checksum(content):
                    data = data.replace(content["checksum"].encode(), b"<checksum ok>")
            except (ValueError, KeyError, TypeError):
                pass  # not JSON with a checksum: compared as it is
        if identity:
            data = data.replace(identity.encode(), b"<identity>")
        found[name] = data
    return found


def tar_of(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar at ``path`` holding ``(name, data)`` members in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
