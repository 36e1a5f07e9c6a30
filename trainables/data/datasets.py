"""The study's image datasets from local folders in their official layouts, plus a generic train/test folder layout.

Every reader returns an ``ImageList``: image paths, labels indexing the dataset's own class table (never a
re-sorted one: folders named by number sort differently as strings), the class names and per-class counts. Nothing
is downloaded. Readers check the layout first and name the missing file or folder; ``check_images`` decodes every
image before any compute and names each unreadable one (skipping them only when asked, and counting them).

Official layouts (``root`` is the folder that contains the dataset's own top folder, as torchvision expects):
- ``cub200``: ``CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, classes.txt, images/}``
- ``food101``: ``food-101/{meta/train.json, meta/test.json, images/}`` (torchvision ``Food101``)
- ``flowers102``: ``flowers-102/{imagelabels.mat, setid.mat, jpg/}``
- ``stanford_cars``: ``stanford_cars/{devkit/, cars_train/, cars_test/, cars_test_annos_withlabels.mat}``
  (torchvision ``StanfordCars``)
- ``oxford_pet``: ``oxford-iiit-pet/{annotations/trainval.txt, annotations/test.txt, images/}`` (torchvision
  ``OxfordIIITPet``)
- ``folder``: ``train/<class>/*``, ``test/<class>/*`` (torchvision ``ImageFolder`` rules; e.g. medical images)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import datasets as tv
from torchvision.transforms import v2 as T

from bench.errors import VarsweepError
from bench.pixels import to_rgb

SPLITS = ("train", "test")
# ``check_images``' kept outcomes: 2 since ``to_rgb`` (EXIF orientation, high bit depths) decides readability, 3
# since a strip longer than ``MAX_ASPECT_RATIO`` is unusable, 4 since an image under ``MIN_IMAGE_SIDE`` is.
CHECK_FORMAT = "v4"
DIGEST_FORMAT = "v1"  # ``content_digests``' kept lists
# Images are resized on their shorter side to the resolution's 288/256 before cropping: a 2 x 1,000 px strip became
# 288 x 144,000 px (1.1 GB for one view), and a longer one ran the token cache's builder out of memory, unnamed. At
# 100:1 a 256 px view's resize is 288 x 28,800 px (25 MB): panoramas and line scans pass.
MAX_ASPECT_RATIO = 100
# A shorter side under this is no picture (a tracking pixel, an icon, a failed download's 1 x 1 placeholder): it was
# scaled up to a blur and trained on. The smallest real images seen are scikit-learn's 8 x 8 digits.
MIN_IMAGE_SIDE = 8


class DatasetError(VarsweepError):
    """A missing folder, a wrong layout or an unreadable image, named."""


class UnknownSplitError(DatasetError):
    """A split name the dataset does not have (a config names it as data.train_split or data.evaluation_split)."""


class MissingRootError(DatasetError):
    """A dataset root that is not a folder (a config names it as data.root)."""


@dataclass(frozen=True)
class ImageList:
    name: str
    split: str
    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def class_counts(self) -> dict[str, int]:
        """Images per class name, in class-index order (classes without images count 0)."""
        counts = Counter(self.labels)
        return {name: counts.get(index, 0) for index, name in enumerate(self.class_names)}

    def fingerprint(self) -> str:
        """Cache key of this split's files on this machine (token caches, reference statistics): SHA-256 over every
        (path, label, size, mtime) and the bytes of ``SAMPLED_FILES`` evenly spaced files, so pixels replaced at the
        same path change the key. One ``stat`` per file; raises ``DatasetError`` naming missing files."""
        return _digest(self, names=[str(p) for p in self.paths], with_mtime=True)

    def content_id(self, root: str | Path) -> str:
        """Where-mounted-independent identity of this split (trial ids): SHA-256 over the split name, every
        (path relative to ``root``, label, size), the class names and the bytes of ``SAMPLED_FILES`` evenly spaced
        files. The same files under another mount give the same id; a renamed, added, resized or (sampled) edited
        file gives another."""
        root = Path(root)
        try:
            names = [Path(p).relative_to(root).as_posix() for p in self.paths]
        except ValueError as err:
            raise DatasetError(
                f"{self.name} {self.split}: an image lies outside the dataset root {root}: {err}"
            ) from err
        return _digest(self, names=names, with_mtime=False)

    def without(self, drop: set[int]) -> ImageList:
        keep = [i for i in range(len(self.paths)) if i not in drop]
        return ImageList(
            self.name,
            self.split,
            tuple(self.paths[i] for i in keep),
            tuple(self.labels[i] for i in keep),
            self.class_names,
        )


SAMPLED_FILES = 64  # files whose bytes enter a split's fingerprint (all of them for smaller splits)


def missing_files(images: ImageList) -> list[str]:
    """Listed images that do not exist (one ``stat`` each): a split file naming images that were never copied."""
    return [str(p) for p in images.paths if not Path(p).is_file()]


def _digest(images: ImageList, *, names: list[str], with_mtime: bool) -> str:
    missing = missing_files(images)
    if missing:
        raise DatasetError(
            f"{images.name} {images.split}: {len(missing)} listed image(s) do not exist: {', '.join(missing[:5])}"
            + (" ..." if len(missing) > 5 else "")
        )
    digest = hashlib.sha256("\n".join([images.split, *images.class_names, ""]).encode())
    for name, path, label in zip(names, images.paths, images.labels):
        info = Path(path).stat()
        fields = [name, label, info.st_size, *([info.st_mtime_ns] if with_mtime else [])]
        digest.update(("\t".join(map(str, fields)) + "\n").encode())
    count = len(images.paths)
    sampled = min(count, SAMPLED_FILES)  # every file of a smaller split, else evenly spaced ones
    for index in sorted({i * count // sampled for i in range(sampled)}):
        digest.update(Path(images.paths[index]).read_bytes())
    return digest.hexdigest()


def _require(*paths: Path, dataset: str) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise DatasetError(
            f"{dataset}: expected layout not found, missing {', '.join(missing)} (see trainables/data/datasets.py)"
        )


def _split(split: str, allowed: tuple[str, ...] = SPLITS) -> str:
    if split not in allowed:
        raise UnknownSplitError(f"unknown split {split!r}; expected one of {allowed}")
    return split


def read_cub200(root: Path, split: str) -> ImageList:
    base = root / "CUB_200_2011"
    files = [
        base / n
        for n in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images")
    ]
    _require(*files, dataset="cub200")
    images, labels, is_train, classes = (_id_table(f) for f in files[:4])
    wanted = "1" if _split(split) == "train" else "0"
    class_ids = sorted(classes, key=int)  # the dataset's own numbering, 1..200
    index_of = {cid: i for i, cid in enumerate(class_ids)}
    _check_cub_split(images, is_train)
    chosen = [iid for iid in sorted(images, key=int) if is_train[iid] == wanted]
    unlabeled = [iid for iid in chosen if iid not in labels]
    if unlabeled:
        raise DatasetError(f"cub200: images {unlabeled[:5]} have no entry in image_class_labels.txt")
    _check_cub_classes(chosen, labels, index_of, base=base)
    return ImageList(
        "cub200",
        split,
        tuple(base / "images" / images[i] for i in chosen),
        tuple(index_of[labels[i]] for i in chosen),
        tuple(classes[c] for c in class_ids),
    )


def _check_cub_classes(
    chosen: list[str], labels: dict[str, str], index_of: dict[str, int], *, base: Path
) -> None:
    """Every chosen image's class id must be one of classes.txt (a hand-edited or mixed-up copy otherwise
    stopped on a bare KeyError naming only the id)."""
    unknown = [iid for iid in chosen if labels[iid] not in index_of]
    if unknown:
        class_ids = sorted(
            {labels[iid] for iid in unknown}, key=lambda cid: (not cid.isdigit(), cid.zfill(12))
        )
        raise DatasetError(
            f"cub200: {len(unknown)} image(s) in {base / 'image_class_labels.txt'} have a class id that "
            f"{base / 'classes.txt'} does not list (image ids {unknown[:5]}{' ...' if len(unknown) > 5 else ''}; "
            f"class ids {class_ids[:5]}{' ...' if len(class_ids) > 5 else ''})"
        )


def _check_cub_split(images: dict[str, str], is_train: dict[str, str]) -> None:
    """Every image must be in exactly one split: one missing from train_test_split.txt (or marked neither 1 nor 0)
    would otherwise drop out of both splits silently."""
    ids = sorted(images, key=int)
    missing = [iid for iid in ids if iid not in is_train]
    odd = {iid: is_train[iid] for iid in ids if iid in is_train and is_train[iid] not in ("0", "1")}
    problems = []
    if missing:
        problems.append(
            f"{len(missing)} image(s) have no entry in train_test_split.txt (ids {missing[:5]}{' ...' if len(missing) > 5 else ''})"
        )
    if odd:
        shown = dict(list(odd.items())[:5])
        problems.append(
            f"{len(odd)} image(s) have a split other than 1 (train) or 0 (test) (id: value {shown}{' ...' if len(odd) > 5 else ''})"
        )
    if problems:
        raise DatasetError("cub200: " + "; ".join(problems))


def _id_table(path: Path) -> dict[str, str]:
    """{id: value} of a CUB annotation file of '<id> <value>' lines; ``DatasetError`` naming the file and line for
    a file that is not UTF-8 text, a line without a value, an id that is not a positive integer or an id given
    twice (a later line overwrote the earlier one: an image vanished, another was listed twice)."""
    try:  # "utf-8-sig": a byte-order mark some editors write is not part of the first id
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err})") from err
    table: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DatasetError(f"{path}:{number}: expected '<id> <value>', got {line!r}")
            if not (parts[0].isascii() and parts[0].isdecimal()) or int(parts[0]) < 1:
                raise DatasetError(f"{path}:{number}: the id {parts[0]!r} is not a positive integer")
            if parts[0] in table:
                raise DatasetError(f"{path}:{number}: id {parts[0]} is given a second time")
            table[parts[0]] = parts[1].strip()
    return table


def read_flowers102(root: Path, split: str) -> ImageList:
    # Own reader: torchvision's Flowers102 insists on the original files' MD5, which rules out subsets and copies.
    from scipy.io import loadmat

    base = root / "flowers-102"
    _require(base / "imagelabels.mat", base / "setid.mat", base / "jpg", dataset="flowers102")
    key = {"train": "trnid", "val": "valid", "test": "tstid"}[_split(split, ("train", "val", "test"))]
    ids = [int(i) for i in _mat_entry(loadmat, base / "setid.mat", key)]
    labels = [int(label) for label in _mat_entry(loadmat, base / "imagelabels.mat", "labels")]
    classes = len(tv.Flowers102.classes)
    outside = sorted({i for i in ids if not 1 <= i <= len(labels)})
    if outside:
        raise DatasetError(
            f"flowers102: {base / 'setid.mat'}'s {key} names image ids {outside[:5]} outside 1..{len(labels)}, "
            f"the images {base / 'imagelabels.mat'} labels"
        )
    wrong = sorted({labels[i - 1] for i in ids if not 1 <= labels[i - 1] <= classes})
    if wrong:
        raise DatasetError(
            f"flowers102: {base / 'imagelabels.mat'} gives labels {wrong[:5]} outside 1..{classes} to images of "
            f"the {split} split"
            + (
                f" (label {classes + 1} would train as the unconditional class)"
                if classes + 1 in wrong
                else ""
            )
        )
    return ImageList(
        "flowers102",
        split,
        tuple(base / "jpg" / f"image_{i:05d}.jpg" for i in ids),
        tuple(int(labels[i - 1]) - 1 for i in ids),
        tuple(tv.Flowers102.classes),
    )


def _mat_entry(loadmat: Callable, path: Path, key: str) -> list:
    """The entry ``key`` of a MATLAB file as a flat list; ``DatasetError`` naming the file for a damaged file or a
    missing entry."""
    from scipy.io.matlab import MatReadError

    try:
        table = loadmat(path, squeeze_me=True)
    except (OSError, ValueError, TypeError, MatReadError) as err:
        raise DatasetError(f"{path}: not a readable MATLAB file ({type(err).__name__}: {err})") from err
    if key not in table:
        raise DatasetError(
            f"{path}: has no entry {key!r} (entries: {sorted(k for k in table if not k.startswith('__'))})"
        )
    return np.atleast_1d(table[key]).tolist()


def _from_torchvision(
    name: str, build: Callable[[], object], files_attr: str, labels_attr: str | None, split: str
) -> ImageList:
    try:
        data = build()
    except (RuntimeError, FileNotFoundError) as err:
        raise DatasetError(
            f"{name}: {err} (local files only; see trainables/data/datasets.py for the layout)"
        ) from err
    except (ValueError, IndexError, KeyError, TypeError) as err:  # torchvision's parsers on a malformed file
        raise DatasetError(
            f"{name}: cannot parse its {split} annotations ({type(err).__name__}: {err}): a line or entry that is "
            "not in the official format (see trainables/data/datasets.py for the layout)"
        ) from err
    if labels_attr is None:  # list of (path, label)
        paths, labels = zip(*getattr(data, files_attr)) if len(data) else ((), ())
    else:
        paths, labels = getattr(data, files_attr), getattr(data, labels_attr)
    return ImageList(
        name, split, tuple(Path(p) for p in paths), tuple(int(x) for x in labels), tuple(data.classes)
    )


def read_food101(root: Path, split: str) -> ImageList:
    base = root / "food-101"
    _require(base / "meta" / f"{_split(split)}.json", base / "images", dataset="food101")
    return _from_torchvision(
        "food101", lambda: tv.Food101(root, split=split, download=False), "_image_files", "_labels", split
    )


def read_stanford_cars(root: Path, split: str) -> ImageList:
    base = root / "stanford_cars"
    annotations = (
        base / "devkit" / "cars_train_annos.mat"
        if _split(split) == "train"
        else base / "cars_test_annos_withlabels.mat"
    )
    _require(
        base / "devkit" / "cars_meta.mat",
        annotations,
        base / f"cars_{_split(split)}",
        dataset="stanford_cars",
    )
    return _from_torchvision(
        "stanford_cars", lambda: tv.StanfordCars(root, split=split, download=False), "_samples", None, split
    )


PET_BREEDS = 37  # the official breed ids 1..37 (torchvision's labels: 0..36)


def read_oxford_pet(root: Path, split: str) -> ImageList:
    official = {"train": "trainval", "test": "test"}[_split(split)]
    base = root / "oxford-iiit-pet"
    _require(base / "annotations" / f"{official}.txt", base / "images", dataset="oxford_pet")
    images = _from_torchvision(
        "oxford_pet",
        lambda: tv.OxfordIIITPet(root, split=official, download=False),
        "_images",
        "_labels",
        split,
    )
    return _present_breeds_numbered(images, annotations=base / "annotations" / f"{official}.txt")


def _present_breeds_numbered(images: ImageList, *, annotations: Path) -> ImageList:
    """Labels re-numbered to the rank of their breed among those present: torchvision's labels are the official
    breed ids (0-36) but its class names only the breeds present in the annotation file (ordered by id), so in a
    subset without a breed label i named another breed than class_names[i], silently. The full dataset (all 37
    breeds) is unchanged; two splits of other breeds differ in their class names (which trial planning refuses)."""
    present = sorted(set(images.labels))
    # (One breed under two ids in range is refused with every reader's listing: ``_check_listing``.)
    beyond = [label + 1 for label in present if not 0 <= label < PET_BREEDS]
    if beyond:
        raise DatasetError(
            f"oxford_pet: {annotations} gives class ids {beyond[:5]} outside the official 1..{PET_BREEDS}: fix "
            "the annotation file"
        )
    if len(present) != len(images.class_names):
        raise DatasetError(
            f"oxford_pet: {annotations} gives {len(present)} breed ids but {len(images.class_names)} breed names "
            "(an image named for one breed labelled as another): fix the annotation file"
        )
    rank = {label: index for index, label in enumerate(present)}
    return ImageList(
        images.name, images.split, images.paths, tuple(rank[x] for x in images.labels), images.class_names
    )


def _require_split_folder(root: Path, split: str) -> Path:
    """``root/<split>``; where it is missing and ``root`` is itself a split's folder (``.../train``), the error says
    that the root is the folder holding both splits."""
    folder = root / _split(split)
    if not folder.is_dir() and root.name in SPLITS and (root.parent / split).is_dir():
        raise DatasetError(
            f"folder: expected layout not found, missing {folder}: the root is the folder holding train/ and test/, "
            f"here {root.parent}, not {root}"
        )
    _require(folder, dataset="folder")
    return folder


def read_folder(root: Path, split: str) -> ImageList:
    """``root/<split>/<class>/**/<image>`` (torchvision's ImageFolder rules: classes sorted by name, images by
    their extensions), leaving out what starts with a dot: torchvision read a notebook's ``.ipynb_checkpoints/`` as
    the first class (trained and scored, every real class's index moved by one) and a Mac's ``._name.png`` resource
    files as images (refused as unreadable)."""
    folder = _require_split_folder(root, split)
    classes = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _hidden(e.name)))
    if not classes:
        raise DatasetError(f"folder: no class folders in {folder} (expected {folder}/<class>/<images>)")
    try:
        samples = tv.folder.make_dataset(
            folder,
            {name: index for index, name in enumerate(classes)},
            is_valid_file=lambda path: _shown_image(path, under=folder),
            allow_empty=False,
        )
    except FileNotFoundError as err:
        raise DatasetError(f"folder: {err}") from err
    return ImageList(
        "folder",
        split,
        tuple(Path(p) for p, _ in samples),
        tuple(label for _, label in samples),
        classes,
    )


def _hidden(name: str) -> bool:
    return name.startswith(".")


# torchvision's image extensions and two more PIL reads: GIF (its first frame; a folder of GIFs was dropped without
# a word) and JPEG's .jfif. Other files in a class folder (notes, HEIC photos PIL cannot read) are not images here.
FOLDER_IMAGE_EXTENSIONS = (*tv.folder.IMG_EXTENSIONS, ".gif", ".jfif")


def _shown_image(path: str, *, under: Path) -> bool:
    """An image file by ``FOLDER_IMAGE_EXTENSIONS``, no part of whose path below ``under`` is hidden."""
    parts = Path(path).relative_to(under).parts
    return tv.folder.has_file_allowed_extension(path, FOLDER_IMAGE_EXTENSIONS) and not any(
        _hidden(part) for part in parts
    )


READERS: dict[str, Callable[[Path, str], ImageList]] = {
    "cub200": read_cub200,
    "food101": read_food101,
    "flowers102": read_flowers102,
    "stanford_cars": read_stanford_cars,
    "oxford_pet": read_oxford_pet,
    "folder": read_folder,
}


def read_dataset(name: str, root: str | Path, split: str) -> ImageList:
    if name not in READERS:
        raise DatasetError(f"unknown dataset {name!r}; known: {sorted(READERS)}")
    root = Path(root)
    if not root.is_dir():
        raise MissingRootError(f"{name}: dataset root {root} does not exist or is not a folder")
    images = READERS[name](root, split)
    if not len(images):
        raise DatasetError(f"{name}: split {split!r} under {root} lists no images")
    _check_listing(images)
    return images


def _check_listing(images: ImageList) -> None:
    """What every reader's listing must hold, whatever its annotation files say: labels that index the class
    names (an out-of-range one trained as the unconditional class or crashed after the token cache), distinct
    class names, no image listed twice (under DP it counted twice in N and its guarantee was a group of two's),
    and file names that are text (one that is not failed the launch with no file named)."""
    where = f"{images.name} {images.split}"
    outside = sorted({label for label in images.labels if not 0 <= label < len(images.class_names)})
    if outside:
        raise DatasetError(
            f"{where}: labels {outside[:5]} do not index its {len(images.class_names)} classes"
        )
    repeated = sorted(name for name, count in Counter(images.class_names).items() if count > 1)
    if repeated:
        raise DatasetError(f"{where}: the class names {repeated[:5]} are given to several classes")
    twice = sorted(
        " = ".join(sorted(set(names))) for names in spellings(images.paths).values() if len(names) > 1
    )
    if twice:
        raise DatasetError(
            f"{where}: {len(twice)} image(s) are listed more than once: {', '.join(twice[:5])}"
            + (" ..." if len(twice) > 5 else "")
        )
    for path in images.paths:
        try:
            str(path).encode()
        except UnicodeEncodeError as err:
            raise DatasetError(
                f"{where}: the file name {os.fsencode(path)!r} is not valid text in this file system's encoding "
                f"({err.reason}): rename it"
            ) from err


def spellings(paths: Iterable[str | Path]) -> dict[str, list[str]]:
    """The listed spellings of each file, keyed by the file itself: ``.`` and ``..`` components and symbolic links
    resolved, so ``jpg/./a.jpg`` and a link to ``jpg/a.jpg`` are the one image they name (one example, whatever an
    annotation file calls it). A path that does not exist resolves as far as it can."""
    named: dict[str, list[str]] = {}
    folders: dict[str, str] = {}  # each folder resolved once: one lstat a file, not one a path component
    for path in paths:
        folder, name = os.path.split(os.fspath(path))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        file = os.path.join(folders[folder], name)
        file = os.path.realpath(file) if name in ("", ".", "..") or os.path.islink(file) else file
        named.setdefault(file, []).append(str(path))
    return named


def check_images(
    images: ImageList,
    *,
    skip_corrupt: bool = False,
    cache_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[ImageList, list[str]]:
    """Decode every image once. Unreadable files raise ``DatasetError`` naming them, unless ``skip_corrupt``:
    then they are dropped and returned (the caller reports the count). With ``cache_dir`` the outcome is kept
    under ``image-checks/`` by the split's ``fingerprint`` (paths, sizes, modification times), so the sweep's
    driver decodes a split once and its trials, and a relaunch, read the outcome; the files it names unreadable
    are decoded again each time (a permission fixed changes no size or time)."""
    record = _check_record(images, cache_dir)
    bad = _read_check(record)
    if bad is None:
        if log is not None:
            log(f"decoding the {len(images)} images of {images.name} {images.split} once")
        bad = _unreadable(images, range(len(images)))
    elif bad:
        bad = _unreadable(images, bad)
    _keep(record, bad)
    if bad and not skip_corrupt:
        listed = "\n  ".join(list(bad.values())[:10])
        raise DatasetError(
            f"{images.name} {images.split}: {len(bad)} unreadable image(s) (a sweep's "
            f"data.skip_corrupt_images: true or the evaluate command's --skip-corrupt-images drops them):\n  {listed}"
        )
    return images.without(set(bad)), list(bad.values())


def content_digests(images: ImageList, *, cache_dir: str | Path | None = None) -> list[str]:
    """The SHA-256 (hex) of every listed file's bytes, in listing order; with ``cache_dir`` kept under
    ``image-digests/`` by the split's ``fingerprint``, so a split is read once. Raises ``DatasetError`` naming a file
    that cannot be read."""
    record = None
    if cache_dir is not None:
        record = Path(cache_dir) / "image-digests" / f"{DIGEST_FORMAT}-{images.fingerprint()}.json"
        try:
            kept = json.loads(record.read_text())
            if isinstance(kept, list) and len(kept) == len(images):
                return kept
        except (OSError, ValueError):
            pass
    digests = []
    for path in images.paths:
        try:
            digests.append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
        except OSError as err:
            raise DatasetError(f"{images.name} {images.split}: cannot read {path}: {err}") from err
    _keep(record, digests)
    return digests


def _keep(record: Path | None, outcome) -> None:
    """Write a split's kept outcome (JSON) to ``record`` whole or not at all: the trials of one sweep may check
    the same split at once. Nothing without a record (no cache, a dry run)."""
    if record is None:
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    staging = record.with_suffix(f".{os.getpid()}.tmp")
    staging.write_text(json.dumps(outcome))
    os.replace(staging, record)


def byte_identical(
    images: ImageList, other: ImageList | None = None, *, cache_dir: str | Path | None = None
) -> list[str]:
    """Files with the same bytes, each group as "a = b": within ``images``, or, given ``other``, an image of
    ``images`` and one of ``other`` (copies and hard links, which ``spellings`` tells apart: they are other files)."""
    groups: dict[str, set[str]] = {}
    splits = [images] if other is None else [images, other]
    for index, split in enumerate(splits):
        for path, digest in zip(split.paths, content_digests(split, cache_dir=cache_dir), strict=True):
            groups.setdefault(digest, set()).add(f"{index}:{path}")
    return sorted(
        " = ".join(sorted(name.split(":", 1)[1] for name in names))
        for names in groups.values()
        if len(names) > 1 and (other is None or len({name.split(":", 1)[0] for name in names}) == 2)
    )


def _check_record(images: ImageList, cache_dir: str | Path | None) -> Path | None:
    """Where ``check_images`` keeps a split's outcome; None without a cache or when the split's files cannot be
    fingerprinted (an unreadable sampled file: the decode then names it)."""
    if cache_dir is None:
        return None
    try:
        return Path(cache_dir) / "image-checks" / f"{CHECK_FORMAT}-{images.fingerprint()}.json"
    except (OSError, DatasetError):
        return None


def _read_check(record: Path | None) -> dict[int, str] | None:
    """The kept outcome {index: why unreadable}, or None when there is none (or it cannot be read)."""
    if record is None:
        return None
    try:
        return {int(i): message for i, message in json.loads(record.read_text()).items()}
    except (OSError, ValueError):
        return None


# What decoding a bad image file raises: damaged or truncated data, an unknown format, and an image over PIL's
# pixel limit (``DecompressionBombError``: not an OSError).
IMAGE_ERRORS = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


def _unreadable(images: ImageList, indices) -> dict[int, str]:
    bad = {}
    for i in indices:
        path = images.paths[i]
        try:
            width, height = open_rgb(path).size
        except IMAGE_ERRORS as err:
            bad[i] = f"{path}: {err}"
            continue
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            bad[i] = (
                f"{path}: {width} x {height} px, too elongated (over {MAX_ASPECT_RATIO}:1): resized on its shorter "
                "side for training, it would be too large to crop from"
            )
        elif min(width, height) < MIN_IMAGE_SIDE:
            bad[i] = (
                f"{path}: {width} x {height} px, under {MIN_IMAGE_SIDE} px on a side: too small to be a picture"
            )
    return bad


def open_rgb(path: str | Path) -> Image.Image:
    """The image file at ``path`` decoded by ``to_rgb`` (8-bit RGB, as displayed), closed again."""
    with Image.open(path) as image:
        return to_rgb(image)


def train_transform(resolution: int = 256, *, resize_ratio: float = 288 / 256) -> Callable:
    """The paper's training augmentation: shorter side to resolution*288/256 (LANCZOS), random crop, [-1, 1]."""
    return T.Compose(
        [
            T.Resize(round(resolution * resize_ratio), interpolation=T.InterpolationMode.LANCZOS),
            T.RandomCrop(resolution),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )


def eval_transform(resolution: int = 256, *, resize_ratio: float = 288 / 256) -> Callable:
    """Evaluation: the same resize, centre crop, [-1, 1]."""
    return T.Compose(
        [
            T.Resize(round(resolution * resize_ratio), interpolation=T.InterpolationMode.LANCZOS),
            T.CenterCrop(resolution),
            T.ToImage(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )


class ImageListDataset(Dataset):
    """(image [3, R, R] in [-1, 1], label) pairs; a file that fails to decode raises naming it."""

    def __init__(self, images: ImageList, transform: Callable):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.images.paths[index]
        try:
            rgb = open_rgb(path)
        except IMAGE_ERRORS as err:
            raise DatasetError(f"cannot read image {path}: {err}") from err
        return self.transform(rgb), self.images.labels[index]
