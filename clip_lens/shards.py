"""Images in WebDataset tar shards, read by index (no model, pure data access).

* `shard_paths`: the ``.tar`` files of a spec: one shard, a folder of shards (recursive, sorted),
  a list, or a brace pattern ``data/train-{000000..000099}.tar`` (expanded here, zero-padded
  like webdataset's ``braceexpand``; counted first, so a pattern of more than `MAX_PATTERN_NAMES`
  names is refused before it is expanded). Shards must be regular files (a FIFO is refused).
* `refuse_mixed_folder`: a folder of images that also holds ``.tar`` shards is refused, never
  read as its loose images alone.
* `TarShards`: a random-access index over the samples of the shards, built from the tar headers
  alone (no image bytes are read while indexing). WebDataset convention: the members whose names
  share a key (the member path up to the first dot of its basename: ``dir/abc.jpg`` and
  ``dir/abc.cls`` → ``dir/abc``) form one sample; its image is its first member with an image
  extension, its label the integer in its ``cls`` / ``cls.txt`` / ``label`` / ``class`` member (a label
  member that does not hold one 64-bit integer is refused, naming the shard and the member).
  Reads use one file handle per shard and process (reopened after ``fork``, never pickled), so a
  `TarShards` can be handed to DataLoader workers.
"""

from __future__ import annotations

import os
import re
import tarfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional, Sequence, Union

import numpy as np

from clip_lens.errors import InputError
from clip_lens.files import open_regular, require_regular

if TYPE_CHECKING:
    import PIL.Image

Spec = Union[str, "os.PathLike[str]", Sequence[Union[str, "os.PathLike[str]"]]]

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm"})
LABEL_EXTENSIONS = ("cls", "cls.txt", "label", "class")  # the first one a sample has is its label
_LABEL_MAX_BYTES = 64  # a longer "label" member is not an integer: label -1, not read
_MAX_OPEN = 16  # shard files kept open per process (least recently used closed first)
_EXAMPLE = "data/train-{000000..000099}.tar"
MAX_PATTERN_NAMES = 1_000_000
"""The most names a brace pattern may expand to (counted before expanding): far above the shard counts
of public data sets (LAION-400M: 41,408; DataComp-1B: ~140,000), far below what costs memory."""
_MAX_BRACE_DEPTH = 32  # braces nested deeper than this are refused (parsing recurses once per level)
_INT64 = (-(2**63), 2**63 - 1)


# --- shard paths ----------------------------------------------------------------------------------
def is_shard(path: Union[str, "os.PathLike[str]"]) -> bool:
    """True when ``path`` is an existing file whose name ends in ``.tar`` (any case)."""
    path = Path(path)
    return path.name.lower().endswith(".tar") and path.is_file()


def _closing_brace(pattern: str, start: int) -> int:
    depth = 0
    for i in range(start, len(pattern)):
        if pattern[i] == "{":
            depth += 1
        elif pattern[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside nested braces."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char == "{") - (char == "}")
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def _range(first: str, last: str, step: Optional[str]) -> tuple[range, int]:
    """``{first..last[..step]}`` as ``(numbers, width)``: zero-padded to ``width``, the longer end,
    when either end has a leading 0 (else width 0). Nothing is materialised: it is counted first."""
    a, b = int(first), int(last)
    increment = abs(int(step)) if step else 1
    if increment == 0:
        raise ValueError("a step of 0")
    numbers = range(a, b + 1, increment) if a <= b else range(a, b - 1, -increment)
    padded = any(len(end.lstrip("-")) > 1 and end.lstrip("-").startswith("0") for end in (first, last))
    return numbers, (max(len(first), len(last)) if padded else 0)


# A parsed pattern is a sequence of parts: literal text (str), alternatives (a list of sequences) or a
# range ((numbers, width)); it is counted (`_count`) before it is expanded (`_expand`).
def _parse(text: str, bad: Callable[[str], InputError]) -> list:
    """``text`` as a sequence of parts (see above), checking its braces."""
    parts: list = []
    while True:
        start = text.find("{")
        if "}" in (text if start < 0 else text[:start]):
            raise bad("a '}' without its '{'")
        if start < 0:
            return parts + [text]
        end = _closing_brace(text, start)
        if end < 0:
            raise bad("a '{' without its '}'")
        inside = text[start + 1:end]
        pieces = _split_top(inside)
        if len(pieces) > 1:
            option: Any = [_parse(piece, bad) for piece in pieces]
        else:
            match = _RANGE.match(inside)
            if not match:
                raise bad(f"{{{inside}}} is neither a list (a,b) nor a numeric range (first..last)")
            try:
                option = _range(*match.groups())
            except ValueError as error:
                raise bad(f"{{{inside}}} has {error}") from None
        parts += [text[:start], option]
        text = text[end + 1:]


def _count(sequence: list) -> int:
    """How many strings ``sequence`` expands to (exact, without expanding it)."""
    total = 1
    for part in sequence:
        if isinstance(part, list):
            total *= sum(_count(alternative) for alternative in part)
        elif isinstance(part, tuple):
            numbers = part[0]  # len() overflows past 2**63 names: counted here instead
            total *= max(0, (abs(numbers.stop - numbers.start) + abs(numbers.step) - 1) // abs(numbers.step))
    return total


def _expand(sequence: list) -> list[str]:
    """Every string of ``sequence``, the leftmost part varying slowest."""
    results = [""]
    for part in sequence:
        if isinstance(part, str):
            options = [part]
        elif isinstance(part, list):
            options = [text for alternative in part for text in _expand(alternative)]
        else:
            numbers, width = part
            options = [f"{n:0{width}d}" for n in numbers]
        results = [head + option for head in results for option in options]
    return results


def _brace_depth(pattern: str) -> int:
    depth = deepest = 0
    for char in pattern:
        depth += (char == "{") - (char == "}")
        deepest = max(deepest, depth)
    return deepest


def expand_braces(pattern: str, limit: int = MAX_PATTERN_NAMES) -> list[str]:
    """Every string of the brace pattern ``pattern``, in order: ``{a,b}`` alternatives and
    ``{000..099}`` / ``{0..10..2}`` ranges (zero-padded to the longer end when either end has a
    leading zero), nested and several per pattern; a pattern without braces is itself.

    The names are counted before any is made: a pattern of more than ``limit`` names
    (`MAX_PATTERN_NAMES`) is refused, whatever memory its expansion would take.

    Raises:
        InputError: unbalanced braces, an empty ``{}``, braces holding neither a list nor a range,
            braces nested more than 32 deep, or more than ``limit`` names.
    """

    def bad(reason: str) -> InputError:
        return InputError(f"the shard pattern {pattern!r} is not a valid brace pattern: {reason}; write ranges as "
                          f"{{000000..000099}} and lists as {{a,b}}, e.g. {_EXAMPLE!r}.")

    if _brace_depth(pattern) > _MAX_BRACE_DEPTH:
        raise bad(f"braces nested more than {_MAX_BRACE_DEPTH} deep")
    parsed = _parse(pattern, bad)
    count = _count(parsed)
    if count > limit:
        raise InputError(f"the shard pattern {pattern!r} expands to {count:,} names, more than the limit of {limit:,}; "
                         "check its ranges, or split the shards into several patterns or folders.")
    return _expand(parsed)


def _exists(path: Path) -> bool:
    """``path.exists()``, False for a name the system cannot look up (too long, a NUL): a pattern then."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def refuse_mixed_folder(folder: Union[str, "os.PathLike[str]"], images: Sequence[Union[str, "os.PathLike[str]"]]) -> None:
    """Refuse the folder ``folder`` when it holds ``.tar`` shards besides the image files ``images``
    found in it: reading only the loose images would leave the shards out without a word, and which
    of the two the user meant cannot be told (nothing is refused when ``images`` is empty: a folder of
    shards)."""
    tars = sorted(p for p in Path(folder).rglob("*") if p.name.lower().endswith(".tar") and not p.is_dir())
    if images and tars:
        raise InputError(
            f"the folder {folder} holds both image files ({len(images):,}, e.g. {images[0]}) and tar shards "
            f"({len(tars):,}, e.g. {tars[0]}); clip_lens reads one or the other: move the loose images or the "
            "shards into a folder of their own and give that."
        )


def _missing(paths: list[Path], spec: Any) -> InputError:
    missing = [p for p in paths if not p.exists()]
    more = f" (and {len(missing) - 1} more of the {len(paths)} shards)" if len(missing) > 1 else ""
    return InputError(f"tar shard {missing[0]} does not exist{more}; check the path or pattern {str(spec)!r} "
                      f"(ranges like {_EXAMPLE!r} are zero-padded like the file names), or leave the missing "
                      "shards out.")


def shard_paths(spec: Spec) -> list[Path]:
    """The tar shards of ``spec``, in reading order.

    Args:
        spec: one ``.tar`` file; a folder (every ``.tar`` file below it, recursively, sorted by
            path); a brace pattern (``"data/train-{000000..000099}.tar"``, see `expand_braces`);
            or a list of any of these (concatenated in order).

    Returns:
        The shard files, each listed once.

    Raises:
        InputError: a missing shard (the first one is named), a file that is not a ``.tar``, a
            FIFO, device or socket, a folder without shards, a bad brace pattern (or one of more
            than `MAX_PATTERN_NAMES` names), an empty list, or a shard given twice.
    """
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("the list of tar shards is empty; give .tar files, a folder of them or a pattern "
                             f"like {_EXAMPLE!r}.")
        paths = [path for item in spec for path in shard_paths(item)]
    elif isinstance(spec, (str, os.PathLike)):
        text = os.fspath(spec)
        path = Path(text)
        if ("{" in text or "}" in text) and not _exists(path):
            paths = [Path(p) for p in expand_braces(text)]
            if any(not p.exists() for p in paths):
                raise _missing(paths, text)
        elif path.is_dir():  # special files named .tar are listed too, and refused below: never skipped silently
            paths = sorted((p for p in path.rglob("*") if p.name.lower().endswith(".tar") and not p.is_dir()),
                           key=lambda p: p.relative_to(path).as_posix())
            if not paths:
                raise InputError(f"the folder {path} holds no .tar shards; give the folder of the shards, the shard "
                                 f"files or a pattern like {_EXAMPLE!r}.")
        elif not path.exists():
            raise _missing([path], text)
        else:
            paths = [path]
    else:
        raise InputError(f"cannot read tar shards from a {type(spec).__name__}; give a .tar file, a folder of them, a "
                         f"list of paths or a pattern like {_EXAMPLE!r}.")
    seen: dict[Path, Path] = {}
    for path in paths:
        if path.is_dir() or not path.name.lower().endswith(".tar"):
            raise InputError(f"{path} is not a tar shard (a file ending in .tar); give .tar files, a folder of them "
                             f"or a pattern like {_EXAMPLE!r}.")
        require_regular(path, "tar shard", "Give the shards as regular .tar files.")
        key = path.resolve()
        if key in seen:
            raise InputError(f"the tar shard {path} is given twice (also as {seen[key]}); list each shard once.")
        seen[key] = path
    return paths


def _shard_names(paths: list[Path]) -> list[str]:
    """The names ids start with: each shard's file name, or, when two shards share a file name,
    their paths relative to the folder they all lie in."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([p.parent for p in resolved]))
    return [p.relative_to(common).as_posix() for p in resolved]


# --- the index ------------------------------------------------------------------------------------
def _split_name(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a member path: ``"dir/abc.seg.PNG"`` → ``("dir/abc", "seg.png")``."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension.lower()


def _is_image(extension: str) -> int:
    """2 for an image extension (``png``), 1 for one ending in one (``seg.png``), else 0."""
    if extension in IMAGE_EXTENSIONS:
        return 2
    return 1 if extension.rpartition(".")[2] in IMAGE_EXTENSIONS else 0


def _damaged(path: Path, count: int, reason: str) -> InputError:
    return InputError(f"tar shard {path} is truncated or damaged: its headers could be read for {count} members, then "
                      f"{reason}; re-create or remove the shard.")


def _index_shard(path: Path) -> tuple[list[tuple[str, str, int, int, int, int, int]], int, int]:
    """``(samples, n_ignored, n_members)`` of one shard from its headers; a sample is ``(key, image
    extension, image offset, image size, label offset, label size, label extension's index in
    LABEL_EXTENSIONS)`` (label offset and index -1: none)."""
    groups: dict[str, dict[str, Any]] = {}  # key → best image, label, in first-seen order
    count = 0
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise InputError(f"tar shard {path} cannot be opened ({exc.strerror or exc}); check its permissions.") from exc
    with handle:
        size = os.fstat(handle.fileno()).st_size
        try:
            with tarfile.open(fileobj=handle, mode="r:") as tar:
                for member in tar:
                    count += 1
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > size:
                        raise _damaged(path, count - 1, f"member {member.name!r} needs {member.size} bytes at offset "
                                                        f"{member.offset_data} but the file ends at {size}")
                    key, extension = _split_name(member.name)
                    group = groups.setdefault(key, {"image": None, "rank": 0, "label": None})
                    rank = _is_image(extension)
                    if rank > group["rank"]:
                        group.update(image=(extension, member.offset_data, member.size), rank=rank)
                    elif group["label"] is None and extension in LABEL_EXTENSIONS:
                        group["label"] = (member.offset_data, member.size, LABEL_EXTENSIONS.index(extension))
                stop = getattr(tar, "offset", None)
        except tarfile.TarError as exc:
            raise _damaged(path, count, f"a header is unreadable ({exc})") from exc
        except OSError as exc:
            raise _damaged(path, count, f"reading failed ({exc.strerror or exc})") from exc
        if stop is not None:  # tarfile stops silently at a bad header after the first: only zeros may follow
            handle.seek(stop)
            rest = handle.read(tarfile.BLOCKSIZE)
            if rest.strip(b"\0"):
                raise _damaged(path, count, f"the header at byte {stop} is unreadable")
    samples, ignored = [], 0
    for key, group in groups.items():
        if group["image"] is None:
            ignored += 1
            continue
        label = group["label"] or (-1, 0, -1)
        samples.append((key, *group["image"], *label))
    return samples, ignored, count


class TarShards:
    """The image samples of WebDataset tar shards, by index.

    Attributes:
        paths: the shard files (`shard_paths` of the spec).
        ids: one string per sample, ``"<shard file name>/<key>"`` (``"train-000.tar/n01440764_10026"``).
        n_ignored: samples (keys) without an image member, left out.
        description: e.g. ``"3 tar shards, 2,000 images"``.

    Samples are in shard order, then in the order of their first member in the tar. Within a shard,
    every member with a sample's key joins it, wherever it lies; the same key in two shards is two
    samples. Picklable (open files are not pickled; each process opens its own).
    """

    def __init__(self, spec: Spec):
        """Index the shards of ``spec`` (see `shard_paths`) from their tar headers.

        Raises:
            InputError: a bad spec (`shard_paths`), a truncated or damaged tar (naming the shard and
                the members read), or a shard without images.
        """
        self.paths = shard_paths(spec)
        names = _shard_names(self.paths)
        self.ids: list[str] = []
        self._extensions: list[str] = []
        shard, image_at, image_size, label_at, label_size, label_kind = [], [], [], [], [], []
        self.n_ignored = 0
        for index, path in enumerate(self.paths):
            samples, ignored, members = _index_shard(path)
            if not samples:
                raise InputError(f"tar shard {path} holds no images ({members} members, {ignored} samples without an "
                                 f"image member: {', '.join(sorted(IMAGE_EXTENSIONS))}); re-create it with the "
                                 "images or remove it from the shards.")
            self.n_ignored += ignored
            for key, extension, offset, size, l_offset, l_size, l_kind in samples:
                self.ids.append(f"{names[index]}/{key}")
                self._extensions.append(extension)
                shard.append(index)
                image_at.append(offset)
                image_size.append(size)
                label_at.append(l_offset)
                label_size.append(l_size)
                label_kind.append(l_kind)
        self._shard = np.asarray(shard, dtype=np.int32)
        self._image = np.asarray([image_at, image_size], dtype=np.int64).reshape(2, -1)
        self._label = np.asarray([label_at, label_size], dtype=np.int64).reshape(2, -1)
        self._label_kind = np.asarray(label_kind, dtype=np.int8)  # index into LABEL_EXTENSIONS (-1: none)
        self._labels: Optional[list[int]] = None
        self._reset()

    # process-local state: open files and their lock, never pickled, reset in a new process
    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._files: "OrderedDict[int, BinaryIO]" = OrderedDict()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_pid", "_lock", "_files")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"TarShards({self.description})"

    @property
    def description(self) -> str:
        """``"3 tar shards, 2,000 images"`` (and how many samples without an image were left out)."""
        n = len(self.paths)
        text = f"{n:,} tar shard{'s' if n != 1 else ''}, {len(self):,} image{'s' if len(self) != 1 else ''}"
        return text + (f" ({self.n_ignored:,} samples without an image left out)" if self.n_ignored else "")

    def _check(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"sample {i} is outside the {len(self)} samples of {self.description}.")
        return int(i) % len(self)

    def _read(self, i: int, offset: int, size: int, what: str) -> bytes:
        """``size`` bytes at ``offset`` of sample ``i``'s shard, through this process's handle."""
        shard = int(self._shard[i])
        path = self.paths[shard]
        if self._pid != os.getpid():  # forked: the parent's handles share its file positions, leave them
            self._reset()
        with self._lock:
            handle = self._files.get(shard)
            if handle is None:
                try:
                    handle = open_regular(path, "tar shard", "Re-create the shard and index the shards again.")
                except OSError as exc:
                    raise InputError(f"tar shard {path} cannot be opened to read {what} of {self.ids[i]} "
                                     f"({exc.strerror or exc}); check that the shard is still there.") from exc
                self._files[shard] = handle
                if len(self._files) > _MAX_OPEN:
                    self._files.popitem(last=False)[1].close()
            self._files.move_to_end(shard)
            try:
                if hasattr(os, "pread"):
                    data = os.pread(handle.fileno(), size, offset)
                else:  # pragma: no cover - Windows
                    handle.seek(offset)
                    data = handle.read(size)
            except OSError as exc:
                raise InputError(f"tar shard {path} cannot be read ({exc.strerror or exc}) at {what} of "
                                 f"{self.ids[i]}; check the disk, re-create the shard or remove it.") from exc
        if len(data) != size:
            raise InputError(f"tar shard {path} ends before {what} of {self.ids[i]} ({len(data)} of {size} bytes at "
                             f"offset {offset}): it changed after it was indexed; re-create or remove the shard and "
                             "index the shards again.")
        return data

    def read(self, i: int) -> bytes:
        """The encoded bytes of sample ``i``'s image member (as stored in the tar)."""
        i = self._check(i)
        return self._read(i, int(self._image[0, i]), int(self._image[1, i]), "the image")

    def name(self, i: int) -> str:
        """Sample ``i``'s image member as messages name it: ``"<shard file name>/<member name>"``."""
        i = self._check(i)
        return f"{self.ids[i]}.{self._extensions[i]}"

    def image(self, i: int, mode: Optional[str] = "RGB") -> "PIL.Image.Image":
        """Sample ``i``'s image, fully decoded (`clip_lens.files.load_image_bytes`; RGB by default).

        Raises:
            InputError: the image cannot be decoded (corrupt, truncated, a bomb …); the message names
                the sample's id and image member.
        """
        from clip_lens.files import load_image_bytes

        return load_image_bytes(self.read(i), self.name(i), mode=mode)

    def label(self, i: int) -> int:
        """Sample ``i``'s label: the integer in its ``cls`` / ``cls.txt`` / ``label`` / ``class``
        member (surrounding whitespace allowed), or -1 when it has none.

        Raises:
            InputError: the label member does not hold one integer that fits in 64 bits (text, a
                fraction, several numbers, empty, ``2**63`` or more); the message names the shard and
                the member. (Collecting skips such a sample and names it, as an undecodable image.)
        """
        i = self._check(i)
        offset, size = int(self._label[0, i]), int(self._label[1, i])
        if offset < 0:
            return -1
        text = self._read(i, offset, size, "the label").strip() if size <= _LABEL_MAX_BYTES else None
        value = int(text) if text is not None and re.fullmatch(rb"[+-]?[0-9]+", text) else None
        if value is None or not _INT64[0] <= value <= _INT64[1]:
            shown = f"{size} bytes" if text is None else repr(text[:32].decode("utf-8", "replace"))
            member = f"{self.ids[i]}.{LABEL_EXTENSIONS[int(self._label_kind[i])]}"
            raise InputError(f"tar shard {self.paths[int(self._shard[i])]}: the label member {member} holds "
                             f"{shown}, not one integer between -2**63 and 2**63-1; write integer class labels in the "
                             "shard's .cls members (text labels belong in .txt or .json members).")
        return value

    @property
    def labels(self) -> list[int]:
        """Every sample's `label` (read on first use, then kept)."""
        if self._labels is None:
            self._labels = [self.label(i) for i in range(len(self))]
        return self._labels

    def close(self) -> None:
        """Close this process's open shard files (later reads reopen them)."""
        with self._lock:
            while self._files:
                self._files.popitem()[1].close()
