"""Dataset readers on small fake copies of each official layout, class mapping, corrupt files, transforms."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

from trainables.data.datasets import (
    DatasetError,
    ImageListDataset,
    check_images,
    eval_transform,
    read_dataset,
    read_folder,
    train_transform,
)


def jpeg(path: Path, *, seed: int | None = None, size: tuple[int, int] = (20, 12)) -> None:
    """Random pixels; ``seed`` None: seeded by the path's last three parts (split/class/name), so the images of a
    made folder differ (byte-identical copies in a folder dataset are refused) and stay the same from run to run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if seed is None:
        seed = int.from_bytes(hashlib.sha256("/".join(path.parts[-3:]).encode()).digest()[:8], "little")
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def make_cub(root: Path) -> None:
    """Classes numbered 1, 2 and 10 (10 sorts before 2 as a string); class 10 has 3 train + 1 test images."""
    base = root / "CUB_200_2011"
    classes = {"1": "001.Albatross", "2": "002.Auklet", "10": "010.Blackbird"}
    per_class = {"1": (1, 1), "2": (2, 1), "10": (3, 1)}
    images, labels, split, image_id = [], [], [], 0
    for cid, (train, test) in per_class.items():
        for n in range(train + test):
            image_id += 1
            rel = f"{classes[cid]}/img_{n}.jpg"
            jpeg(base / "images" / rel, seed=image_id)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {cid}")
            split.append(f"{image_id} {1 if n < train else 0}")
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("classes.txt", [f"{cid} {name}" for cid, name in classes.items()]),
    ):
        (base / name).write_text("\n".join(lines) + "\n")


def make_food(root: Path) -> None:
    base = root / "food-101"
    meta = {
        "train": {"apple_pie": ["apple_pie/1", "apple_pie/2"], "waffles": ["waffles/3"]},
        "test": {"apple_pie": ["apple_pie/4"], "waffles": ["waffles/5", "waffles/6"]},
    }
    for split, table in meta.items():
        (base / "meta").mkdir(parents=True, exist_ok=True)
        (base / "meta" / f"{split}.json").write_text(json.dumps(table))
        for rels in table.values():
            for i, rel in enumerate(rels):
                jpeg(base / "images" / f"{rel}.jpg", seed=i)


def make_flowers(root: Path) -> None:
    base = root / "flowers-102"
    labels = np.array([1, 1, 2, 3, 3, 3, 102])
    for i in range(1, len(labels) + 1):
        jpeg(base / "jpg" / f"image_{i:05d}.jpg", seed=i)
    savemat(base / "imagelabels.mat", {"labels": labels})
    savemat(
        base / "setid.mat",
        {"trnid": np.array([1, 3, 4]), "valid": np.array([2]), "tstid": np.array([5, 6, 7])},
    )


def make_cars(root: Path) -> None:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    savemat(
        base / "devkit" / "cars_meta.mat",
        {"class_names": np.array(["AM General Hummer", "Acura RL", "Audi R8"], dtype=object)},
    )
    for split, annotations_path, entries in (
        ("train", base / "devkit" / "cars_train_annos.mat", [("00001.jpg", 1), ("00002.jpg", 3)]),
        (
            "test",
            base / "cars_test_annos_withlabels.mat",
            [("00001.jpg", 2), ("00002.jpg", 2), ("00003.jpg", 3)],
        ),
    ):
        record = np.array(entries, dtype=[("fname", "O"), ("class", "O")])
        savemat(annotations_path, {"annotations": record})
        for i, (fname, _) in enumerate(entries):
            jpeg(base / f"cars_{split}" / fname, seed=i)


def make_pet(root: Path) -> None:
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    rows = {
        "trainval": [("Abyssinian_1", 1, 1), ("Abyssinian_2", 1, 1), ("american_bulldog_1", 2, 2)],
        "test": [("Abyssinian_3", 1, 1), ("american_bulldog_2", 2, 2)],
    }
    for split, entries in rows.items():
        (base / "annotations" / f"{split}.txt").write_text(
            "".join(f"{name} {label} {species} 1\n" for name, label, species in entries)
        )
        for i, (name, _, _) in enumerate(entries):
            jpeg(base / "images" / f"{name}.jpg", seed=i)


def make_folder(root: Path) -> None:
    for split, counts in (("train", {"2": 2, "10": 3}), ("test", {"2": 1, "10": 2})):
        for cls, n in counts.items():
            for i in range(n):
                jpeg(root / split / cls / f"{i}.png")


LAYOUTS = {
    "cub200": (
        make_cub,
        {
            "train": {"001.Albatross": 1, "002.Auklet": 2, "010.Blackbird": 3},
            "test": {"001.Albatross": 1, "002.Auklet": 1, "010.Blackbird": 1},
        },
    ),
    "food101": (make_food, {"train": {"apple_pie": 2, "waffles": 1}, "test": {"apple_pie": 1, "waffles": 2}}),
    "stanford_cars": (
        make_cars,
        {
            "train": {"AM General Hummer": 1, "Acura RL": 0, "Audi R8": 1},
            "test": {"AM General Hummer": 0, "Acura RL": 2, "Audi R8": 1},
        },
    ),
    "oxford_pet": (
        make_pet,
        {"train": {"Abyssinian": 2, "American Bulldog": 1}, "test": {"Abyssinian": 1, "American Bulldog": 1}},
    ),
    "folder": (make_folder, {"train": {"10": 3, "2": 2}, "test": {"10": 2, "2": 1}}),
}


# Where each fake layout says which class a file belongs to, independently of the reader.
CARS_FILES = {
    "train": {"00001.jpg": "AM General Hummer", "00002.jpg": "Audi R8"},
    "test": {"00001.jpg": "Acura RL", "00002.jpg": "Acura RL", "00003.jpg": "Audi R8"},
}
CLASS_OF_PATH = {
    "cub200": lambda path, split: path.parent.name,
    "food101": lambda path, split: path.parent.name,
    "folder": lambda path, split: path.parent.name,
    "oxford_pet": lambda path, split: " ".join(
        part.title() for part in path.stem.rsplit("_", 1)[0].split("_")
    ),
    "stanford_cars": lambda path, split: CARS_FILES[split][path.name],
}


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("split", ["train", "test"])
def test_reader_on_fake_official_layout(name, split, tmp_path):
    make, expected = LAYOUTS[name]
    make(tmp_path)
    images = read_dataset(name, tmp_path, split)
    assert images.class_counts == expected[split]
    assert all(p.is_file() for p in images.paths) and len(images) == sum(expected[split].values())
    truth = CLASS_OF_PATH[name]
    assert [images.class_names[label] for label in images.labels] == [
        truth(path, split) for path in images.paths
    ]


def test_flowers_uses_official_split_ids_and_labels(tmp_path):
    make_flowers(tmp_path)
    train, test = read_dataset("flowers102", tmp_path, "train"), read_dataset("flowers102", tmp_path, "test")
    assert [p.name for p in train.paths] == ["image_00001.jpg", "image_00003.jpg", "image_00004.jpg"]
    assert train.labels == (0, 1, 2) and test.labels == (2, 2, 101) and len(train.class_names) == 102
    assert read_dataset("flowers102", tmp_path, "val").labels == (0,)


def test_numbered_classes_map_through_the_datasets_own_table(tmp_path):
    """CUB ids 1, 2, 10 keep their numeric order; a folder dataset maps each image to its own folder's class."""
    make_cub(tmp_path / "cub")
    cub = read_dataset("cub200", tmp_path / "cub", "train")
    assert cub.class_names == ("001.Albatross", "002.Auklet", "010.Blackbird")
    assert [cub.class_names[label] for label in cub.labels] == [p.parent.name for p in cub.paths]
    make_folder(tmp_path / "folder")
    folder = read_dataset("folder", tmp_path / "folder", "train")
    assert [folder.class_names[label] for label in folder.labels] == [p.parent.name for p in folder.paths]
    assert folder.class_counts == {"10": 3, "2": 2}


def test_a_folder_dataset_leaves_out_hidden_folders_and_files(tmp_path):
    """torchvision read a notebook's ``.ipynb_checkpoints/`` as the first class (trained and scored; every real
    class's index moved by one; an empty one stopped the run as "your" class) and a Mac's ``._0.png`` as an image
    (refused as unreadable)."""
    make_folder(tmp_path)
    before = read_dataset("folder", tmp_path, "train")
    jpeg(tmp_path / "train" / ".ipynb_checkpoints" / "0.png", seed=9)
    (tmp_path / "train" / ".empty").mkdir()
    (tmp_path / "train" / "2" / "._0.png").write_bytes(b"\0\x05\x16\x07 a resource fork")
    jpeg(tmp_path / "train" / "10" / ".thumbnails" / "0.png", seed=8)
    jpeg(
        tmp_path / "train" / "10" / "sub" / "9.png", seed=7
    )  # a plain subfolder still counts (ImageFolder's rule)
    # A GIF (its first frame) is an image too: torchvision's extensions left it out without a word
    frames = [Image.new("P", (12, 10), color) for color in (3, 7)]
    frames[0].save(tmp_path / "train" / "2" / "moving.gif", save_all=True, append_images=frames[1:])
    (tmp_path / "train" / "2" / "notes.txt").write_text("not an image")
    images = read_dataset("folder", tmp_path, "train")
    assert images.class_names == before.class_names == ("10", "2")
    added = [str(tmp_path / "train/10/sub/9.png"), str(tmp_path / "train/2/moving.gif")]
    assert sorted(map(str, images.paths)) == sorted([*map(str, before.paths), *added])
    assert check_images(images)[0] == images  # nothing unreadable left in
    (tmp_path / "empty_split" / "train" / ".hidden").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no class folders in"):
        read_folder(tmp_path / "empty_split", "train")


@pytest.mark.parametrize("name", sorted(LAYOUTS) + ["flowers102"])
def test_missing_or_wrong_layout_is_named(name, tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(name, tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=f"{name}: expected layout not found, missing"):
        read_dataset(name, tmp_path / "empty", "train")


@pytest.mark.parametrize(
    "name, images",
    [("food101", "food-101/images"), ("oxford_pet", "oxford-iiit-pet/images")]
    + [("stanford_cars", f"stanford_cars/cars_{split}") for split in ("train", "test")],
)
def test_a_missing_image_folder_is_named_not_left_to_torchvision(name, images, tmp_path):
    """torchvision's own message said "Dataset not found" and offered to download it: varsweep downloads nothing."""
    LAYOUTS[name][0](tmp_path)
    shutil.rmtree(tmp_path / images)
    split = images.rsplit("_", 1)[-1] if name == "stanford_cars" else "train"
    with pytest.raises(
        DatasetError, match=f"{name}: expected layout not found, missing {tmp_path / images} \\("
    ):
        read_dataset(name, tmp_path, split)


def test_bad_names_and_splits():
    with pytest.raises(DatasetError, match="unknown dataset 'imagenet'"):
        read_dataset("imagenet", ".", "train")
    with pytest.raises(DatasetError, match="unknown split 'validation'"):
        read_dataset("folder", ".", "validation")


def test_corrupt_images_are_named_and_skipped_only_on_request(tmp_path):
    make_folder(tmp_path)
    broken = tmp_path / "train" / "2" / "0.png"
    broken.write_bytes(b"not an image at all")
    (tmp_path / "train" / "10" / "1.png").write_bytes(
        broken.read_bytes()[:0] + b"\x89PNG\r\n\x1a\n" + b"\0" * 10
    )
    images = read_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"2 unreadable image\(s\)") as error:
        check_images(images)
    assert str(broken) in str(error.value)
    kept, dropped = check_images(images, skip_corrupt=True)
    assert len(kept) == 3 and len(dropped) == 2 and sum(kept.class_counts.values()) == 3
    with pytest.raises(DatasetError, match=f"cannot read image {broken}"):
        ImageListDataset(images, eval_transform(16))[images.paths.index(broken)]


@pytest.mark.parametrize(
    ("unusable", "kept", "problem"),
    [
        ((2, 1000), (1000, 10), r"2 x 1000 px, too elongated \(over 100:1\)"),
        ((1, 1), (8, 8), r"1 x 1 px, under 8 px on a side"),
    ],
)
def test_an_image_too_elongated_or_too_small_is_named_and_skipped_like_a_corrupt_one(
    tmp_path, unusable, kept, problem
):
    """A 2 x 1,000 px strip passed the check and took 1.1 GB for one view (288 x 144,000 px after the resize); a
    longer one ran the token cache's builder out of memory with no file named. 100:1 is the longest kept. A 1 x 1
    placeholder (a failed download) passed and was scaled up to a training view; 8 x 8, the size of
    scikit-learn's digits, is kept."""
    make_folder(tmp_path)
    bad, good = tmp_path / "train" / "2" / "0.png", tmp_path / "train" / "2" / "1.png"
    Image.new("RGB", unusable, "white").save(bad)
    Image.new("RGB", kept, "white").save(good)
    images = read_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=rf"1 unreadable image\(s\).*\n  {bad}: {problem}"):
        check_images(images)
    kept_images, dropped = check_images(images, skip_corrupt=True)
    assert bad not in kept_images.paths and good in kept_images.paths and len(dropped) == 1


def test_transparent_pixels_are_shown_on_white_whatever_colour_the_file_keeps_under_them(tmp_path):
    """``convert("RGB")`` dropped the alpha: two fully transparent files were a black and a white image."""
    from trainables.data.datasets import open_rgb

    under_black, under_white = np.zeros((8, 8, 4), np.uint8), np.full((8, 8, 4), 255, np.uint8)
    under_white[..., 3] = 0
    half_red = np.zeros((8, 8, 4), np.uint8)
    half_red[..., 0], half_red[..., 3] = 255, 128
    grey_alpha = np.zeros((8, 8, 2), np.uint8)
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    palette.info["transparency"] = 1
    files = {
        "under-black.png": Image.fromarray(under_black, "RGBA"),
        "under-white.png": Image.fromarray(under_white, "RGBA"),
        "half-red.png": Image.fromarray(half_red, "RGBA"),
        "grey-alpha.png": Image.fromarray(grey_alpha, "LA"),
        "palette.png": palette,
    }
    for name, image in files.items():
        image.save(tmp_path / name, **({"transparency": 1} if image.mode == "P" else {}))
    white = np.full((8, 8, 3), 255, np.uint8)
    for name in ("under-black.png", "under-white.png", "grey-alpha.png", "palette.png"):
        assert np.array_equal(np.asarray(open_rgb(tmp_path / name)), white), name
    # 50% red over white, as a viewer shows it on a white page
    assert np.asarray(open_rgb(tmp_path / "half-red.png"))[0, 0].tolist() == [255, 127, 127]


def test_an_image_over_pil_s_pixel_limit_is_named_and_skipped_like_a_corrupt_one(tmp_path, monkeypatch):
    """PIL refuses an image over twice ``MAX_IMAGE_PIXELS`` (a whole-slide scan: 179M pixels by default) with
    ``DecompressionBombError``, which is no OSError: it escaped the check unnamed, and skip_corrupt_images could
    not drop it. Here the limit is lowered so a 100 x 100 image is over it."""
    from PIL import Image as PILImage

    from trainables.data import token_cache
    from trainables.data.token_cache import ViewSpec

    make_folder(tmp_path)
    large = tmp_path / "train" / "2" / "0.png"
    PILImage.new("RGB", (100, 100), "white").save(large)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1_000)
    images = read_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"1 unreadable image\(s\)") as error:
        check_images(images)
    assert str(large) in str(error.value) and "decompression bomb" in str(error.value)
    kept, dropped = check_images(images, skip_corrupt=True)
    assert len(kept) == len(images) - 1 and len(dropped) == 1
    with pytest.raises(DatasetError, match=f"cannot read image {large}"):
        ImageListDataset(images, eval_transform(16))[images.paths.index(large)]
    with pytest.raises(DatasetError, match=f"cannot read image {large}"):
        token_cache._read_views(large, spec=ViewSpec(resolution=16, num_views=1, seed=0))


def test_a_split_is_decoded_once_and_its_outcome_kept_until_a_file_changes(tmp_path, monkeypatch):
    import trainables.data.datasets as datasets_module

    make_folder(tmp_path / "data")
    broken = tmp_path / "data" / "test" / "10" / "1.png"
    broken.write_bytes(b"not an image")
    images, cache, logged = read_dataset("folder", tmp_path / "data", "test"), tmp_path / "cache", []
    with pytest.raises(
        DatasetError,
        match=r"1 unreadable image\(s\) \(a sweep's data.skip_corrupt_images: true or the evaluate command's "
        r"--skip-corrupt-images drops them\)",
    ):
        check_images(images, cache_dir=cache, log=logged.append)
    assert logged == ["decoding the 3 images of folder test once"]
    decode, decoded = datasets_module._unreadable, []

    def spy(images, indices):
        decoded.extend(indices)
        return decode(images, indices)

    monkeypatch.setattr(datasets_module, "_unreadable", spy)
    kept, dropped = check_images(images, skip_corrupt=True, cache_dir=cache, log=logged.append)
    assert len(kept) == 2 and len(dropped) == 1 and dropped[0].startswith(f"{broken}: ") and len(logged) == 1
    assert decoded == [images.paths.index(broken)]  # only the file named unreadable is decoded again
    # A file the record names unreadable that reads now (a permission fixed: same size and time) is kept.
    (record,) = (cache / "image-checks").glob("*.json")
    fixed = next(i for i in range(len(images)) if images.paths[i] != broken)
    record.write_text(json.dumps({fixed: "was unreadable", images.paths.index(broken): "unreadable"}))
    kept, dropped = check_images(images, skip_corrupt=True, cache_dir=cache)
    assert (
        len(kept) == 2
        and dropped[0].startswith(f"{broken}: ")
        and json.loads(record.read_text()).keys() == {str(images.paths.index(broken))}
    )
    record.write_text("{truncated")  # a damaged record is decoded anew
    assert len(check_images(images, skip_corrupt=True, cache_dir=cache)[0]) == 2
    monkeypatch.setattr(datasets_module, "_unreadable", decode)
    jpeg(broken, seed=5)  # repaired: a new size and modification time, so a new fingerprint
    kept, dropped = check_images(read_dataset("folder", tmp_path / "data", "test"), cache_dir=cache)
    assert len(kept) == 3 and not dropped


def test_a_corrupt_evaluation_image_stops_the_sweep_before_the_tiny_base_is_trained(tmp_path):
    from sweep_driver import tiny_trial

    from bench.schema import DataConfig, replace
    from trainables.trial import prepare_shared

    make_folder(tmp_path / "data")
    (tmp_path / "data" / "test" / "2" / "0.png").write_bytes(b"")
    config = replace(
        tiny_trial("lora"),
        data=DataConfig(dataset="folder", root=str(tmp_path / "data"), resolution=16).__dict__,
    )
    with pytest.raises(DatasetError, match=r"folder test: 1 unreadable image"):
        prepare_shared([config], tmp_path / "cache", log=None)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["image-checks"]


def test_transforms_follow_the_paper(tmp_path):
    jpeg(tmp_path / "wide.jpg", size=(60, 30))
    image = Image.open(tmp_path / "wide.jpg")
    torch.manual_seed(0)
    x = train_transform(16)(image)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    a, b = eval_transform(16)(image), eval_transform(16)(image)
    assert torch.equal(a, b) and a.shape == (3, 16, 16)
    crops = {tuple(train_transform(16)(image).flatten()[:8].tolist()) for _ in range(6)}
    assert len(crops) > 1  # random crops differ


@pytest.mark.parametrize(
    "split_lines, expected",
    [
        (
            lambda lines: lines[:2] + lines[3:],
            r"cub200: 1 image\(s\) have no entry in train_test_split.txt \(ids \['3'\]\)",
        ),
        (
            lambda lines: [line if not line.startswith("5 ") else "5 2" for line in lines],
            r"cub200: 1 image\(s\) have a split other than 1 \(train\) or 0 \(test\) \(id: value \{'5': '2'\}\)",
        ),
    ],
)
def test_cub_image_in_no_split_is_an_error_naming_it(tmp_path, split_lines, expected):
    """An image missing from train_test_split.txt (or marked neither 1 nor 0) used to drop out of both splits."""
    make_cub(tmp_path)
    split_file = tmp_path / "CUB_200_2011" / "train_test_split.txt"
    split_file.write_text("\n".join(split_lines(split_file.read_text().splitlines())) + "\n")
    for split in ("train", "test"):
        with pytest.raises(DatasetError, match=expected):
            read_dataset("cub200", tmp_path, split)


def test_a_cub_class_id_missing_from_classes_txt_is_named(tmp_path):
    """An image whose class id classes.txt does not list stopped the reader on a bare KeyError."""
    make_cub(tmp_path)
    base = tmp_path / "CUB_200_2011"
    (base / "classes.txt").write_text("1 001.Albatross\n2 002.Auklet\n")  # class 10 left out
    with pytest.raises(DatasetError) as err:
        read_dataset("cub200", tmp_path, "train")
    message = str(err.value)
    assert f"3 image(s) in {base / 'image_class_labels.txt'}" in message
    assert f"{base / 'classes.txt'} does not list (image ids ['6', '7', '8']; class ids ['10'])" in message
    # a class folder's name where its id belongs is named too (sorting the ids as numbers raised ValueError)
    labels_file = base / "image_class_labels.txt"
    first, *rest = labels_file.read_text().splitlines()
    labels_file.write_text("\n".join([f"{first.split()[0]} 001.Albatross", *rest]) + "\n")
    with pytest.raises(DatasetError, match=r"class ids \['10', '001\.Albatross'\]"):
        read_dataset("cub200", tmp_path, "train")


def test_an_oxford_pet_subset_without_a_breed_labels_each_image_with_its_own_breed(tmp_path):
    """torchvision labels pets by official breed id (0-36) but names only the breeds present: in a subset without
    breed 2, breed 3's images were label 2, past the class names, and counted for no class."""
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    rows = {
        "trainval": [
            ("Abyssinian_1", 1),
            ("american_pit_bull_terrier_1", 3),
            ("american_pit_bull_terrier_2", 3),
        ],
        "test": [("Abyssinian_2", 1), ("american_bulldog_1", 2)],
    }
    for split, entries in rows.items():
        (base / "annotations" / f"{split}.txt").write_text(
            "".join(f"{n} {label} 1 1\n" for n, label in entries)
        )
        for i, (name, _) in enumerate(entries):
            jpeg(base / "images" / f"{name}.jpg", seed=i)
    train, test = (read_dataset("oxford_pet", tmp_path, split) for split in ("train", "test"))
    for images in (train, test):
        assert [images.class_names[label] for label in images.labels] == [
            CLASS_OF_PATH["oxford_pet"](path, images.split) for path in images.paths
        ]
    assert train.labels == (0, 1, 1)
    assert train.class_counts == {"Abyssinian": 1, "American Pit Bull Terrier": 2}
    # Splits of other breeds differ in their class names, which trial planning refuses by name.
    assert train.class_names != test.class_names == ("Abyssinian", "American Bulldog")


def displayed_images(folder: Path) -> dict[Path, np.ndarray]:
    """Image files PIL's own ``convert("RGB")`` gets wrong, each with the 8-bit RGB [H, W, 3] a viewer shows:
    16-bit greyscale (modes I;16 and I), float greyscale (mode F), EXIF-turned pictures and a transparent one
    (shown on white, whatever colour the file keeps under it)."""
    folder.mkdir(parents=True, exist_ok=True)
    levels = np.arange(256, dtype=np.uint16).reshape(16, 16)  # every 8-bit level once
    grey = np.repeat(levels.astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(levels * 257).save(folder / "16-bit.png")  # 257 * k: level k of 255 at 16 bits
    Image.fromarray(levels * 257).save(folder / "16-bit.pgm")  # opens as mode I
    Image.fromarray((levels / 255).astype(np.float32)).save(folder / "float.tiff")
    stored = np.zeros((8, 16, 3), np.uint8)
    stored[:, :8, 0], stored[:, 8:, 2] = 255, 255  # stored landscape: left red, right blue
    turned_right, turned_left = Image.Exif(), Image.Exif()
    turned_right[0x0112], turned_left[0x0112] = 6, 8  # EXIF orientation: shown turned 90 degrees cw / ccw
    Image.fromarray(stored).save(folder / "turned.png", exif=turned_right)
    Image.fromarray(levels[:8] * 257).save(folder / "16-bit-turned.png", exif=turned_left)
    hidden_red = np.zeros((8, 8, 4), np.uint8)
    hidden_red[..., 0] = 255
    Image.fromarray(hidden_red, "RGBA").save(folder / "transparent.png")
    return {
        folder / "16-bit.png": grey,
        folder / "16-bit.pgm": grey,
        folder / "float.tiff": grey,
        folder / "turned.png": np.rot90(stored, k=-1),
        folder / "16-bit-turned.png": np.rot90(grey[:8], k=1),
        folder / "transparent.png": np.full((8, 8, 3), 255, np.uint8),
    }


def test_high_bit_depths_are_rescaled_and_exif_orientation_applied_for_training(tmp_path):
    """A 16-bit scan used to come out almost white (clipped at 255) and a phone photo lying on its side."""
    expected = displayed_images(tmp_path / "data" / "train" / "a")
    images, dropped = check_images(
        read_dataset("folder", tmp_path / "data", "train"), cache_dir=tmp_path / "c"
    )
    dataset = ImageListDataset(images, transform=np.asarray)
    for i, path in enumerate(images.paths):
        assert np.array_equal(dataset[i][0], expected[path]), path.name
    from trainables.data.datasets import CHECK_FORMAT, open_rgb, to_rgb

    assert not dropped and [p.name for p in (tmp_path / "c" / "image-checks").iterdir()] == [
        f"{CHECK_FORMAT}-{images.fingerprint()}.json"  # outcomes of the older decoding are not read
    ]
    for path, pixels in expected.items():
        with Image.open(path) as image:
            assert np.array_equal(np.asarray(to_rgb(image)), pixels) and np.array_equal(
                open_rgb(path), pixels
            )


def test_analysis_thumbnails_decode_as_training_does(tmp_path):
    """The analysis's thumbnail of each file is the thumbnail of the 8-bit picture the training pipeline sees (it
    restated the decoding, and missed the transparency rule when training gained it)."""
    from analysis.figures import _thumb

    for path, pixels in displayed_images(tmp_path).items():
        eight_bit = tmp_path / f"{path.name}.8bit.png"
        Image.fromarray(np.ascontiguousarray(pixels)).save(eight_bit)
        assert np.array_equal(np.asarray(_thumb(path)), np.asarray(_thumb(eight_bit))), path.name


def _edit_mat(path: Path, **entries) -> None:
    savemat(path, {**{k: v for k, v in loadmat(path).items() if not k.startswith("__")}, **entries})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        # label 103 trained as the unconditional class; 0 crashed after the token cache was built
        (
            lambda b: _edit_mat(b / "imagelabels.mat", labels=np.array([103, 1, 2, 3, 3, 3, 102])),
            r"labels \[103\] outside 1\.\.102 .*unconditional",
        ),
        (
            lambda b: _edit_mat(b / "imagelabels.mat", labels=np.array([0, 1, 2, 3, 3, 3, 102])),
            r"labels \[0\] outside 1\.\.102",
        ),
        (
            lambda b: _edit_mat(b / "setid.mat", trnid=np.array([1, 3, 40])),
            r"setid.mat's trnid names image ids \[40\] outside 1\.\.7",
        ),
        (
            lambda b: _edit_mat(b / "setid.mat", trnid=np.array([1, 3, 3, 4])),
            r"flowers102 train: 1 image\(s\) are listed more than once: .*image_00003",
        ),
        (lambda b: (b / "setid.mat").write_bytes(b"MATLAB 5.0"), r"setid.mat: not a readable MATLAB file"),
        (
            lambda b: savemat(b / "imagelabels.mat", {"label": np.array([1])}),
            r"imagelabels.mat: has no entry 'labels' \(entries: \['label'\]\)",
        ),
    ],
)
def test_flowers_annotations_out_of_range_repeated_or_damaged_are_named(tmp_path, edit, message):
    make_flowers(tmp_path)
    edit(tmp_path / "flowers-102")
    with pytest.raises(DatasetError, match=message):
        read_dataset("flowers102", tmp_path, "train")


@pytest.mark.parametrize(
    ("file", "edit", "message"),
    [
        # a later line overwrote the earlier one: image 1 vanished and another was listed twice
        (
            "images.txt",
            lambda lines: [*lines, "1 002.Auklet/img_0.jpg"],
            r"images.txt:10: id 1 is given a second time",
        ),
        (
            "classes.txt",
            lambda lines: [*lines, "x12 012.Extra"],
            r"classes.txt:4: the id 'x12' is not a positive integer",
        ),
        ("classes.txt", lambda lines: ["1 001.Albatros\xe9", *lines[1:]], r"classes.txt: not UTF-8 text"),
    ],
)
def test_cub_annotation_files_with_repeated_ids_or_bad_text_are_named(tmp_path, file, edit, message):
    make_cub(tmp_path)
    path = tmp_path / "CUB_200_2011" / file
    text = "\n".join(edit(path.read_text().splitlines())) + "\n"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DatasetError, match=message):
        read_dataset("cub200", tmp_path, "train")


@pytest.mark.parametrize(
    ("spelling", "named"),
    [
        ("dotdot", r"Blackbird/\.\./010\.Blackbird/img_0\.jpg = .*/img_0\.jpg"),
        ("link", r"img_0\.jpg = .*link\.jpg"),
    ],
)
def test_one_image_listed_under_two_spellings_is_listed_twice(tmp_path, spelling, named):
    """``010.Blackbird/../010.Blackbird/img_0.jpg`` or a symbolic link to ``img_0.jpg`` names the image another
    line lists: under DP it would count twice in N, so it is refused like a repeated line."""
    make_cub(tmp_path)
    base = tmp_path / "CUB_200_2011"
    other = "010.Blackbird/../010.Blackbird/img_0.jpg"
    if spelling == "link":
        (base / "images" / "010.Blackbird" / "link.jpg").symlink_to("img_0.jpg")
        other = "010.Blackbird/link.jpg"
    listed = base / "images.txt"
    lines = listed.read_text().splitlines()
    assert lines[5:7] == ["6 010.Blackbird/img_0.jpg", "7 010.Blackbird/img_1.jpg"]  # both train images
    listed.write_text("\n".join([*lines[:6], f"7 {other}", *lines[7:]]) + "\n")
    with pytest.raises(
        DatasetError, match=r"cub200 train: 1 image\(s\) are listed more than once: .*" + named
    ):
        read_dataset("cub200", tmp_path, "train")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        # an id beyond the 37 breeds made a second "Abyssinian" class
        (
            [("Abyssinian_1", 1), ("Abyssinian_2", 38)],
            r"trainval.txt gives class ids \[38\] outside the official 1\.\.37",
        ),
        (
            [("Abyssinian_1", 1), ("Abyssinian_1", 1)],
            r"oxford_pet train: 1 image\(s\) are listed more than once",
        ),
        ([("Abyssinian_1", 1), ("# a comment", 1)], r"oxford_pet: cannot parse its train annotations"),
    ],
)
def test_pet_annotations_beyond_the_breeds_repeated_or_malformed_are_named(tmp_path, rows, message):
    base = tmp_path / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    (base / "annotations" / "trainval.txt").write_text("".join(f"{n} {label} 1 1\n" for n, label in rows))
    for name, _ in rows:
        if not name.startswith("#"):
            jpeg(base / "images" / f"{name}.jpg")
    with pytest.raises(DatasetError, match=message):
        read_dataset("oxford_pet", tmp_path, "train")


def test_a_file_name_that_is_not_text_is_named_before_any_compute(tmp_path):
    """A name the file system holds as bytes (Latin-1 on a UTF-8 system) passed the dry run, then failed the launch
    with a UnicodeEncodeError naming no file."""
    make_folder(tmp_path)
    folder = os.fsencode(tmp_path / "train" / "2")
    os.rename(os.path.join(folder, b"0.png"), os.path.join(folder, b"caf\xe9.png"))
    with pytest.raises(
        DatasetError, match=r"folder train: the file name b'.*caf\\xe9\.png' is not valid text"
    ):
        read_dataset("folder", tmp_path, "train")


def test_cub_files_with_a_byte_order_mark_read_and_non_ascii_digits_are_named(tmp_path):
    """A UTF-8 byte-order mark (some editors write one) made the first id '\\ufeff1'; a superscript two passed
    ``isdigit`` and failed ``int`` with a bare ValueError."""
    make_cub(tmp_path)
    classes = tmp_path / "CUB_200_2011" / "classes.txt"
    text = classes.read_text()
    classes.write_text("\ufeff" + text, encoding="utf-8")
    assert read_dataset("cub200", tmp_path, "train").class_names == (
        "001.Albatross",
        "002.Auklet",
        "010.Blackbird",
    )
    classes.write_text(text + "\u00b2 012.Extra\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="classes.txt:4: the id '\u00b2' is not a positive integer"):
        read_dataset("cub200", tmp_path, "train")
