"""Files in and out: atomic writes, output paths checked before the work, images decoded with
one clear error per bad file.

* `atomic_write`: a reader never sees a half-written file, a crash keeps the old one; a
  failed write (read-only folder, full disk, a folder in the way …) raises `WriteError`,
  one sentence naming the path and the fix.
* `check_outputs`: before any work, refuse outputs that would overwrite an input, collide
  with each other, sit where a file/folder of the other kind is, or land in a folder that cannot be
  written; existing outputs are refused unless ``force``.
* `load_image` / `image_problem`: decode an image file completely (missing, corrupt,
  truncated and header-only files, decompression bombs, odd modes such as 1-bit, 16-bit or CMYK);
  `load_image_bytes`: the same for encoded bytes (a member of a tar shard), through the same code.
* `require_regular` / `open_regular` / `read_bytes`: the one check that a file read is a regular
  file: a FIFO, a device or a socket is refused without being opened (opening a FIFO waits for a
  writer forever; ``/dev/zero`` never ends), and again on the opened file.
* `read_text` / `read_json`: UTF-8 text and JSON with one-line errors; JSON nested deeper than
  `MAX_JSON_DEPTH` is refused before it is parsed (`json_nesting`).
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import stat
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Mapping, Optional, Sequence, Union

from clip_lens.errors import ClipLensError

if TYPE_CHECKING:
    import PIL.Image

Payload = Union[bytes, str, Callable[[BinaryIO], None]]
PathLike = Union[str, "os.PathLike[str]"]


class WriteError(ClipLensError, OSError):
    """A file that could not be written (an ``OSError`` too, with the original ``errno``): the
    message names the path, the reason and what to do."""


_WRITE_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is used up: free some space or write somewhere else",
    errno.EROFS: "the file system is read-only: write somewhere else",
    errno.EACCES: "the folder is not writable: write somewhere else or change its permissions",
    errno.EPERM: "the folder is not writable: write somewhere else or change its permissions",
    errno.EISDIR: "a folder of that name is in the way: give another file name",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.ENAMETOOLONG: "the name is too long: choose a shorter path",
    errno.EFBIG: "the file is larger than this file system allows: write somewhere else",
    errno.ENOENT: "no such file or folder: check the path",
}


def os_error_fix(exc: OSError) -> str:
    """What to do about a failed file operation, by its ``errno`` (a generic hint when unknown)."""
    return _WRITE_FIXES.get(exc.errno, "check the path, its permissions and the free disk space, or write somewhere else")


def write_error(path: PathLike, exc: OSError) -> WriteError:
    """The `WriteError` for ``exc`` raised while writing ``path``."""
    if isinstance(exc, WriteError):
        return exc
    reason = exc.strerror or str(exc) or type(exc).__name__
    error = WriteError(f"cannot write {path}: {reason}; {os_error_fix(exc)}.")
    error.errno = exc.errno
    return error


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, Path], data: Payload) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    ``data`` is bytes, text (UTF-8), or a callable that writes into the binary file it is given
    (``lambda f: torch.save(obj, f)``). The folder must exist. Any ``OSError`` (read-only folder,
    full disk, a folder named ``path`` …) is raised as `WriteError`, whose message names
    ``path`` and the fix; the previous file, if any, is kept and no temporary file is left.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise
    return path


# --- reading: regular files only -------------------------------------------------------------------
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class _NotRegular(Exception):
    """A path that is not a regular file; the message is what it is (``"a FIFO (named pipe)"``)."""


def _special_kind(mode: int) -> Optional[str]:
    """What a file of stat mode ``mode`` is when it is neither a regular file nor a folder, else None."""
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((kind for test, kind in _SPECIAL_KINDS if test(mode)), "a special file")


def special_file(path: PathLike) -> Optional[str]:
    """What ``path`` is when it exists but is neither a regular file nor a folder (``"a FIFO (named
    pipe)"``, ``"a character device"``, ``"a block device"``, ``"a socket"``), else None (also for a
    missing path). Found with ``stat``, without opening the file: opening a FIFO waits for a writer."""
    try:
        return _special_kind(os.stat(path).st_mode)
    except (OSError, ValueError):  # missing, unreadable, a NUL in the name: the caller's open explains
        return None


_REGULAR_FIX = "Give a regular file or folder."


def _not_regular_message(what: str, path: PathLike, kind: str, fix: str) -> str:
    return f"{what} {path} is {kind}, not a regular file or folder: reading it could wait forever or never end. {fix}"


def require_regular(path: PathLike, what: str = "file", fix: str = _REGULAR_FIX) -> Path:
    """``path``, refused when it is a FIFO, a device or a socket (`special_file`).

    Missing paths and folders pass: the caller says what it expects there. ``what`` names the file in
    the message (``"--image file"``, ``"checkpoint"``), ``fix`` says what to do (a sentence).

    Raises:
        InputError: ``"{what} {path} is a FIFO (named pipe), not a regular file: …"``.
    """
    from clip_lens.errors import InputError

    kind = special_file(path)
    if kind is not None:
        raise InputError(_not_regular_message(what, path, kind, fix))
    return Path(path)


def _open_regular(path: PathLike) -> BinaryIO:
    """``path`` opened for binary reading; `_NotRegular` when it is not a regular file. Checked with
    ``stat`` before opening (a device is never opened) and with ``fstat`` on the opened file (opened
    non-blocking, so a FIFO swapped in after the first check cannot block either)."""
    kind = special_file(path)
    if kind is not None:
        raise _NotRegular(kind)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
        if not stat.S_ISREG(mode):
            raise _NotRegular(_special_kind(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_regular(path: PathLike, what: str = "file", fix: str = _REGULAR_FIX) -> BinaryIO:
    """``path`` opened for binary reading, refused when it is a FIFO, a device or a socket, before
    and after opening, without ever blocking on it.

    Raises:
        InputError: a FIFO, device or socket (the message names ``what`` and ``path``, then ``fix``).
        OSError: the file cannot be opened (missing, a folder, no permission …).
    """
    from clip_lens.errors import InputError

    try:
        return _open_regular(path)
    except _NotRegular as kind:
        raise InputError(_not_regular_message(what, path, str(kind), fix)) from None


def read_bytes(path: PathLike, what: str = "file", fix: str = _REGULAR_FIX) -> bytes:
    """The bytes of the regular file ``path`` (`open_regular`: a FIFO or device is refused, never read)."""
    with open_regular(path, what, fix) as handle:
        return handle.read()


def read_text(path: Union[str, Path], what: str) -> str:
    """A UTF-8 text file (a BOM is dropped); undecodable bytes raise an InputError naming the byte
    and its line. ``what`` names the file in the message ("text bank file"). A FIFO or device is
    refused (`read_bytes`)."""
    from clip_lens.errors import InputError

    raw = read_bytes(path, what)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise InputError(
            f"{what} {str(path)!r} is not UTF-8: byte 0x{raw[error.start]:02x} on line {line} cannot be "
            "decoded; re-save the file as UTF-8."
        ) from error


MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects `read_json` accepts. The files clip_lens reads nest at
most 4 deep (an SAE ``cfg.json``: 3); Python's parser overflows its stack past about 1,000 levels
(a ``RecursionError``), so deeper files are refused, before parsing, with a message."""

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a JSON string, escapes included
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_nesting(text: str) -> int:
    """How deep the arrays and objects of the JSON ``text`` nest (``'[1, {"a": [2]}]'``: 3), counted
    from its brackets outside strings, in linear time and without recursion (valid or not)."""
    import numpy as np

    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    opens = (codes == ord("[")) | (codes == ord("{"))
    return int(np.cumsum(np.where(opens, 1, -1)).max())


def read_json(path: Union[str, Path], what: str, expected: str, object_pairs_hook=None,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A UTF-8 JSON file (`read_text`: a FIFO or device is refused); invalid JSON raises an
    InputError with the line and column and ``expected``, what the file should hold (e.g.
    ``'{"NAME.png": [[x0, y0, x1, y1]]}'``). JSON nested deeper than ``max_depth`` is refused before
    it is parsed (`json_nesting`), so no file can exhaust the parser's stack."""
    from clip_lens.errors import InputError

    text = read_text(path, what)
    depth = json_nesting(text)
    if depth > max_depth:
        raise InputError(f"{what} {str(path)!r} nests arrays and objects {depth} levels deep, more than the limit of "
                         f"{max_depth}; fix the file (it should hold {expected}).")
    try:
        return json.loads(text, object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as error:
        raise InputError(
            f"{what} {str(path)!r} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}; "
            f"fix the file (it should hold {expected})."
        ) from error


# --- output paths ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """One path a command will write.

    Attributes:
        path: the file, or the folder of files (``folder=True``).
        name: how messages call it, e.g. ``"--out spans.json"`` or ``"the figure q.png (next to --out)"``.
        folder: a folder the command writes files into (else one file).
        resume: the path holds an unfinished run of this same command, which it continues: its
            contents are expected, not an existing output.
    """

    path: Path
    name: str
    folder: bool = False
    resume: bool = False


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def writable_problem(folder: Path) -> Optional[OSError]:
    """The error of creating (and removing) a temporary file in the existing ``folder``, or None."""
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".clip_lens_probe_", suffix=".tmp")
    except OSError as exc:
        return exc
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass
    return None


def _inputs(inputs: Mapping[str, Any]) -> list[tuple[str, Path]]:
    found = []
    for label, value in inputs.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for item in values:
            if item is None or not isinstance(item, (str, os.PathLike)):
                continue
            path = Path(item)
            try:
                if path.exists():
                    found.append((label, path))
            except (OSError, ValueError):  # a name too long for a path, or with a NUL: not a file
                pass
    return found


def check_outputs(outputs: Sequence[Output], inputs: Optional[Mapping[str, Any]] = None, force: bool = False) -> None:
    """Refuse, before any work, outputs that cannot or should not be written.

    Checked for every output, in this order: two outputs with the same path; an output that is an
    input (resolved, hard links too) or lies inside an input folder; a file where a folder is
    expected or the reverse (also a file among the parent folders); a folder that cannot be written
    (a temporary file is created and removed in the nearest existing folder); and, unless ``force``
    or ``Output.resume``, an output that exists already (a file, or a folder that is not empty).
    Nothing is created.

    Args:
        outputs: what the command will write.
        inputs: label → path, list of paths or None (e.g. ``{"--images": folder, "--image": [a, b]}``);
            labels name the inputs in messages (``"the --images folder …"``); values that are not
            existing paths (model names, ``"general"``) are ignored.
        force: existing outputs may be replaced (files of the same names in an output folder).

    Raises:
        InputError: one sentence naming the output and the fix.
    """
    from clip_lens.errors import InputError

    given = _inputs(inputs or {})
    for i, first in enumerate(outputs):
        for second in outputs[i + 1:]:
            if _same(first.path, second.path):
                raise InputError(f"{first.name} and {second.name} are the same path {first.path}; give them different paths.")
    for output in outputs:
        path = output.path
        for label, source in given:
            kind = "folder" if source.is_dir() else "file"
            if _same(path, source):
                raise InputError(f"{output.name} is the {label} {kind} {source}, an input of this command: writing it "
                                 "would destroy the input; choose another path.")
            if source.is_dir() and source.resolve() in path.resolve().parents:
                raise InputError(f"{output.name} is inside the {label} folder {source}; write outside the inputs.")
        if path.is_dir() and not output.folder:
            raise InputError(f"{output.name} is a folder, but a file is written there; give a file name.")
        if path.exists() and not path.is_dir() and output.folder:
            raise InputError(f"{output.name} is a file, but a folder of results is written there; give a folder.")
        existing = _nearest_existing(path if output.folder else path.parent)
        if not existing.is_dir():
            raise InputError(f"{output.name} cannot be created: {existing} is a file, not a folder; choose another path.")
        problem = writable_problem(existing)
        if problem is not None:
            reason = problem.strerror or str(problem)
            raise InputError(f"{output.name} cannot be written: {existing} is not writable ({reason}); "
                             f"{os_error_fix(problem)}.")
        if force or output.resume:
            continue
        if path.is_file() or (path.exists() and not path.is_dir()):
            raise InputError(f"{output.name} already exists; pass --force to replace it, or choose another path.")
        if path.is_dir():
            held = sorted(entry.name for entry in path.iterdir())
            if held:
                shown = ", ".join(held[:3]) + (", …" if len(held) > 3 else "")
                raise InputError(f"{output.name} already holds files ({shown}); pass --force to write into it (files "
                                 "of the same names are replaced), or choose a new or empty folder.")


# --- images ---------------------------------------------------------------------------------------
class _ImageProblem(Exception):
    pass


def _to_rgb(image: "PIL.Image.Image") -> "PIL.Image.Image":
    """Any PIL mode as 8-bit RGB: 16/32-bit integer and float greyscale are scaled (not clipped)
    into 0..255; 1-bit, palette, CMYK, alpha … through PIL's conversion."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if image.mode.startswith("I;16") or (low >= 0 and 255 < high <= 65535 and image.mode == "I"):
            scaled = values / 257.0  # 16-bit → 8-bit
        elif low >= 0 and high <= 1 and image.mode == "F":
            scaled = values * 255.0
        elif low >= 0 and high <= 255:
            scaled = values
        else:
            scaled = (values - low) / max(high - low, 1e-12) * 255.0
        grey = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _ImageProblem(f"has the colour mode {image.mode}, which cannot be converted to RGB ({exc})") from exc


def _open_file(path: Path) -> BinaryIO:
    """``path`` opened for reading, or `_ImageProblem` (missing, a folder, a FIFO or device, not
    readable)."""
    if not path.exists():
        raise _ImageProblem("does not exist")
    if path.is_dir():
        raise _ImageProblem("is a folder, not an image file")
    try:
        return _open_regular(path)
    except _NotRegular as kind:
        raise _ImageProblem(f"is {kind}, not a regular file (reading it could wait forever or never end)") from None
    except OSError as exc:
        raise _ImageProblem(f"cannot be opened ({exc.strerror or exc})") from exc


def _decode(opener: Callable[[], BinaryIO]) -> "PIL.Image.Image":
    """The fully decoded image (its own mode) of the binary file ``opener()`` returns (closed here),
    or `_ImageProblem` with the reason. The one decoding path of files and bytes."""
    from PIL import Image, UnidentifiedImageError

    handle = opener()
    limit = Image.MAX_IMAGE_PIXELS
    with handle, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked below, as an error
        try:
            image = Image.open(handle)
        except UnidentifiedImageError as exc:
            raise _ImageProblem("is not an image file PIL can read (unknown format, corrupt, or cut off after its "
                                "header)") from exc
        except Image.DecompressionBombError as exc:
            raise _ImageProblem(f"is a decompression bomb ({exc})") from exc
        except Exception as exc:  # PIL plugins raise OSError, SyntaxError, struct.error … on broken headers
            raise _ImageProblem(f"is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
        width, height = image.size
        if limit is not None and width * height > limit:
            raise _ImageProblem(
                f"has {width}x{height} = {width * height} pixels, more than PIL's decompression-bomb limit "
                f"Image.MAX_IMAGE_PIXELS = {limit}; shrink the image (or, for a file you trust, raise "
                "PIL.Image.MAX_IMAGE_PIXELS in Python)"
            )
        if width * height == 0:
            raise _ImageProblem(f"is empty ({width}x{height} pixels)")
        try:
            image.load()
        except Exception as exc:  # truncated data, bad chunks, decoder errors
            raise _ImageProblem(f"is truncated or corrupt ({type(exc).__name__}: {exc})") from exc
    return image


def _load(opener: Callable[[], BinaryIO], name: str, what: str, mode: Optional[str]) -> "PIL.Image.Image":
    """`_decode` then the conversion to ``mode``; an `_ImageProblem` becomes the InputError naming ``name``."""
    from clip_lens.errors import InputError

    try:
        image = _decode(opener)
        return _to_rgb(image) if mode == "RGB" else (image if mode is None else image.convert(mode))
    except _ImageProblem as problem:
        raise InputError(f"{what} {name} {problem}; replace or remove the file.") from problem


def load_image(path: PathLike, what: str = "image", mode: Optional[str] = "RGB") -> "PIL.Image.Image":
    """Decode the image file ``path`` completely and return it as a PIL image.

    Args:
        path: the file.
        what: how the message calls it (``"--image file"``, ``"mask"``).
        mode: ``"RGB"`` (default): 8-bit RGB, with 16-bit and float greyscale scaled into 0..255 and
            1-bit, palette, CMYK and alpha images converted; None: the decoded image in its own mode.

    Raises:
        InputError: one sentence naming the file and what is wrong with it: missing, a folder, not
            an image (corrupt, unknown format, header only), truncated, larger than
            ``PIL.Image.MAX_IMAGE_PIXELS`` (a decompression bomb), or a mode with no RGB conversion.
    """
    path = Path(path)
    return _load(lambda: _open_file(path), str(path), what, mode)


def load_image_bytes(data: bytes, name: str, what: str = "image", mode: Optional[str] = "RGB") -> "PIL.Image.Image":
    """Decode the encoded image ``data`` (the bytes of an image file) completely and return it as a
    PIL image, with the same checks, conversions and messages as `load_image`.

    Args:
        data: the encoded image (PNG, JPEG … bytes), e.g. a member of a tar shard.
        name: where the bytes come from, used in messages (``"shard-000.tar/n01440764_10026.jpg"``).
        what, mode: as in `load_image`.

    Raises:
        InputError: one sentence naming ``name`` and what is wrong with the image (see `load_image`).
    """
    return _load(lambda: io.BytesIO(data), name, what, mode)


def image_problem(path: PathLike) -> Optional[str]:
    """Why the image file ``path`` cannot be decoded to RGB (e.g. ``"is truncated or corrupt …"``),
    or None when it can (see `load_image`)."""
    path = Path(path)
    try:
        _to_rgb(_decode(lambda: _open_file(path)))
    except _ImageProblem as problem:
        return str(problem)
    return None


def readable_images(paths: Iterable[PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """``(readable, unreadable)``: the paths that decode (in order) and ``(path, reason)`` of the others."""
    good, bad = [], []
    for path in paths:
        problem = image_problem(path)
        if problem is None:
            good.append(Path(path))
        else:
            bad.append((Path(path), problem))
    return good, bad
