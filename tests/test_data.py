"""Offline source (procedural shapes) and target (scikit-learn digits) image sets."""

from __future__ import annotations

import pytest
import torch

from trainables.data import offline


def test_shapes_are_deterministic_and_splits_differ():
    a = offline.shapes(split="train", images_per_class=3, image_size=16, seed=1)
    b = offline.shapes(split="train", images_per_class=3, image_size=16, seed=1)
    test = offline.shapes(split="test", images_per_class=3, image_size=16, seed=1)
    assert a.images_N3HW.dtype == torch.uint8 and a.images_N3HW.shape == (30, 3, 16, 16)
    assert torch.equal(a.images_N3HW, b.images_N3HW) and not torch.equal(a.images_N3HW, test.images_N3HW)
    assert a.class_counts() == {name: 3 for name in offline.SHAPE_CLASSES}


def test_digits_split_is_stratified_and_complete():
    train, test = offline.digits(split="train", image_size=16), offline.digits(split="test", image_size=16)
    assert len(train) + len(test) == 1797 and train.images_N3HW.shape[1:] == (3, 16, 16)
    for name in offline.DIGIT_CLASSES:
        total = train.class_counts()[name] + test.class_counts()[name]
        assert abs(test.class_counts()[name] - 0.2 * total) <= 1
    assert train.images_N3HW.float().mean() > 128  # light paper, dark ink


def test_unit_range():
    img = torch.tensor([0, 255], dtype=torch.uint8)
    assert torch.equal(offline.to_unit_range(img), torch.tensor([-1.0, 1.0]))


def test_bad_split():
    with pytest.raises(ValueError, match="split must be one of"):
        offline.shapes(split="val", images_per_class=1)


def test_glyphs_are_letters_and_symbols_drawn_in_varied_styles():
    from trainables.data import glyphs

    assert not any(ch.isdigit() for ch in glyphs.GLYPH_CLASSES)  # the target domain stays unseen
    assert len(set(glyphs.GLYPH_CLASSES)) == len(glyphs.GLYPH_CLASSES) >= 40
    assert all(
        len(glyphs.fonts_for(ch)) >= 5 for ch in glyphs.GLYPH_CLASSES
    )  # several fonts draw every glyph
    images, labels = glyphs.glyph_images(split="train", images_per_class=4, image_size=16, seed=3)
    again, _ = glyphs.glyph_images(split="train", images_per_class=4, image_size=16, seed=3)
    test, _ = glyphs.glyph_images(split="test", images_per_class=4, image_size=16, seed=3)
    assert images.shape == (4 * len(glyphs.GLYPH_CLASSES), 3, 16, 16) and images.dtype == torch.uint8
    assert torch.equal(images, again) and not torch.equal(images, test)
    assert torch.bincount(labels).tolist() == [4] * len(glyphs.GLYPH_CLASSES)
    # Strokes: every image has ink clearly apart from its paper, and the tones vary (dark on light and light on dark).
    pixels = images.float().flatten(2)  # [N, 3, H*W]: coloured glyphs may differ from their paper in hue only
    spread = (pixels.quantile(0.95, dim=2) - pixels.quantile(0.05, dim=2)).amax(dim=1)
    assert (spread > 40).float().mean() > 0.95
    paper = images.float().mean(dim=1)[:, 0, 0]
    assert (paper > 170).any() and (paper < 80).any()


def test_offline_listing_matches_the_written_folder(tmp_path):
    from trainables.data.datasets import read_dataset

    files, names = offline.listing("digits", tmp_path, "test", image_size=16)
    assert not any(tmp_path.iterdir())  # listing writes nothing (dry runs)
    written = read_dataset("folder", offline.write_folder("digits", tmp_path, image_size=16), "test")
    assert written.paths == tuple(p for p, _ in files) and written.labels == tuple(
        label for _, label in files
    )
    assert written.class_names == names


def _readable(path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
    except (OSError, SyntaxError):
        return False
    return True


def test_concurrent_writers_of_an_offline_folder_write_it_once(tmp_path, monkeypatch):
    """Two writers that both find no ``complete`` marker: the second waits for the first (a file lock), finds
    the marker and reuses its folder, so no image is rewritten while a reader trusts the marker."""
    import threading

    arrived, generated, real = threading.Barrier(2, timeout=2.0), [], offline._split_set

    def split_set(*args, **kwargs):
        generated.append(threading.current_thread().name)
        try:
            arrived.wait()  # unlocked writers both get here; with a lock, the first waits alone, then goes on
        except threading.BrokenBarrierError:
            pass
        return real(*args, **kwargs)

    monkeypatch.setattr(offline, "_split_set", split_set)
    folders, errors = [], []

    def write() -> None:
        try:
            folders.append(offline.write_folder("digits", tmp_path, image_size=8))
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    writers = [threading.Thread(target=write, name=f"writer-{i}") for i in range(2)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=300)
    assert errors == [] and len(folders) == 2 and folders[0] == folders[1]
    assert len(generated) == len(offline.SPLITS) and len(set(generated)) == 1  # one writer generated it
    images = list(folders[0].rglob("*.png"))
    assert (folders[0] / "complete").is_file() and len(images) == 1797 and all(map(_readable, images))


def test_an_interrupted_offline_write_leaves_no_partial_image(tmp_path, monkeypatch):
    """Every PNG is written atomically: a writer stopped mid-image leaves the images before it whole, no part
    of the one it was writing, no marker; the next call completes the folder."""
    from PIL import Image

    real_save, calls = Image.Image.save, []

    def failing_save(self, fp, *args, **kwargs):
        calls.append(fp)
        if len(calls) == 5:
            with open(fp, "wb") as handle:  # the first bytes of the image, then the writer stops
                handle.write(b"\x89PNG\r\n\x1a\n")
            raise OSError("No space left on device")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        offline.write_folder("digits", tmp_path, image_size=8)
    folder = offline.folder_path("digits", tmp_path, image_size=8)
    left = [path for path in folder.rglob("*") if path.is_file()]
    assert len(left) == 4 and all(path.suffix == ".png" and _readable(path) for path in left)
    monkeypatch.undo()
    assert offline.write_folder("digits", tmp_path, image_size=8) == folder
    images = list(folder.rglob("*.png"))
    assert (folder / "complete").is_file() and len(images) == 1797 and all(map(_readable, images))
