import numpy as np
import pytest
from PIL import Image

from bnnctl.workers.data.classification import (ClassAugmentConfig, ImageFolderDataset, center_crop,
                                                write_digits_imagefolder)
from bnnctl.workers.errors import DataError


def test_image_folder_classes_in_sorted_order_and_transforms(tmp_path):
    for cls, colour in (("zebra", (255, 0, 0)), ("ant", (0, 255, 0))):
        for split in ("train", "val"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (300, 200), colour).save(tmp_path / split / cls / "a.JPEG")
    ds = ImageFolderDataset(tmp_path, "val", 224)
    assert ds.classes == ["ant", "zebra"]
    item = ds[1]
    assert item["label"] == 1 and item["image"].shape == (3, 224, 224)
    assert item["image"][0].mean() > item["image"][1].mean()  # the zebra folder is red
    train = ImageFolderDataset(tmp_path, "train", 64, ClassAugmentConfig(), seed=1)
    assert (train[0]["image"] == train[0]["image"]).all() and train[0]["image"].shape == (3, 64, 64)


def test_center_crop_follows_the_imagenet_protocol():
    img = Image.new("RGB", (512, 300))
    out = center_crop(img, 224)
    assert out.size == (224, 224)


def test_missing_image_folder_explains_the_layout(tmp_path):
    with pytest.raises(DataError) as err:
        ImageFolderDataset(tmp_path / "imagenet", "train", 224)
    assert "train/<class>/<image>" in str(err.value) and "bnnctl data digits" in str(err.value)


def test_embedded_digits_are_real_digits_in_the_imagefolder_layout(tmp_path):
    root = write_digits_imagefolder(tmp_path / "digits")
    train, val = ImageFolderDataset(root, "train", 32), ImageFolderDataset(root, "val", 32)
    assert train.classes == [str(d) for d in range(10)]
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert write_digits_imagefolder(root) == root  # already there: a no-op
    img = np.asarray(Image.open(val.samples[0][0]))
    assert img.shape == (32, 32) and img.max() > 200 and img.min() < 30


def test_processes_writing_the_embedded_digits_at_once_all_succeed(tmp_path):
    """Parallel variants preparing the embedded data in a fresh folder at the same moment."""
    import racers

    root = tmp_path / "digits"
    outcomes = racers.race(racers.write_digits, (str(root),), 3)
    assert outcomes == [str(root)] * 3, outcomes
    assert sum(1 for _ in root.rglob("*.png")) == 1797
    assert [p.name for p in tmp_path.iterdir()] == ["digits"]  # no temporary folder left behind
