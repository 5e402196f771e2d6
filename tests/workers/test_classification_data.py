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


def test_resize_then_random_crop_is_its_paper_pipeline():
    """IT §5: "resizing the images to have 256px over the smallest dimension and then randomly
    cropping them": every crop is a window of the resized image, at full resolution (no zoom)."""
    from bnnctl.workers.data.classification import resize_random_crop

    grid = np.arange(400 * 300, dtype=np.uint32).reshape(300, 400)  # a distinct value per pixel
    img = Image.fromarray(np.stack([grid % 256, (grid // 256) % 256, grid // 65536], -1).astype(np.uint8))
    resized = np.asarray(img.resize((341, 256), Image.Resampling.BILINEAR))  # shorter side 300 -> 256
    seen = set()
    for seed in range(20):
        out = np.asarray(resize_random_crop(img, 224, np.random.default_rng(seed), 256))
        assert out.shape == (224, 224, 3)
        hits = [(x, y) for y in range(256 - 223) for x in range(341 - 223)
                if (resized[y, x] == out[0, 0]).all() and (resized[y:y + 224, x:x + 224] == out).all()]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 10  # the window moves: a random crop, not the centre


def test_resize_smaller_than_the_crop_is_refused():
    from bnnctl.workers.config import from_dict
    from bnnctl.workers.errors import ConfigError
    from bnnctl.workers.train import TrainConfig

    data = {"model": {"arch": "resnet18"}, "loss": "ce",
            "data": {"dataset": "imagenet", "input_size": 224, "class_augment": {"crop": "resize_random", "resize": 200}}}
    with pytest.raises(ConfigError) as err:
        from_dict(TrainConfig, data, "")
    assert err.value.path == "data.class_augment.resize" and "224 px crop" in err.value.message
