"""The web app of CLIP-InterpreT's five analyses (``clip-lens app``): a Starlette application on uvicorn
(`clip_lens.app.server`; both imported only when a server runs) and one static page, no external resources.

>>> from clip_lens import HookedCLIP
>>> from clip_lens.app import demo_workspace, serve
>>> model = HookedCLIP.from_pretrained("toy-shapes")
>>> workspace = demo_workspace(model, "runs/app")                                   # doctest: +SKIP
>>> serve(model, workspace.store, workspace.labels, thumbnails=workspace.thumbnails)  # doctest: +SKIP

Tabs: property-based nearest neighbours, per-head topic segmentation, contrastive segmentation,
per-head nearest neighbours of an image, and of a text, and the features of SAEs (``saes=`` of
[`make_server`][clip_lens.app.make_server]; `clip_lens.app.features`) (see ``docs/concepts/app.md``).
"""

from clip_lens.app.api import Api
from clip_lens.app.server import AppServer, is_loopback, make_server, serve
from clip_lens.app.workspace import Workspace, demo_workspace

__all__ = ["Api", "AppServer", "Workspace", "demo_workspace", "is_loopback", "make_server", "serve"]
