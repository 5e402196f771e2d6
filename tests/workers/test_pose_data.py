import json

import numpy as np
import pytest
import torch
from scipy.io import savemat

from bnnctl.workers.data.geometry import apply_affine, crop_matrix, flip_points, invert_affine, warp
from bnnctl.workers.data.heatmaps import HeatmapCodec, flip_heatmaps, flip_test
from bnnctl.workers.data.pose import (LSP_FLIP_PAIRS, MPII_FLIP_PAIRS, AugmentConfig, PoseDataset, read_lsp,
                                      read_mpii)
from bnnctl.workers.data.synthetic import SyntheticConfig, generate, render, write_synthetic_mpii
from bnnctl.workers.errors import DataError

CODEC = HeatmapCodec(64, 16, 1.0)


def test_heatmap_round_trip_within_a_quarter_pixel():
    rng = np.random.default_rng(0)
    pts = rng.uniform(CODEC.stride * 1.5, 64 - CODEC.stride * 1.5, (500, 2))  # interior of the map
    maps, weights = CODEC.encode(pts, np.ones(500))
    coords, peaks = CODEC.decode(torch.from_numpy(maps)[None])
    err = np.abs(CODEC.to_heatmap(coords[0].numpy()) - CODEC.to_heatmap(pts))
    assert err.max() <= 0.25 + 1e-9
    assert (weights == 1).all() and (peaks > 0.6).all()


def test_outside_or_unlabeled_joints_have_zero_weight_and_map():
    pts = np.array([[10.0, 10.0], [-20.0, 5.0], [30.0, 30.0]])
    maps, weights = CODEC.encode(pts, np.array([1, 1, 0]))
    assert weights.tolist() == [1, 0, 0]
    assert maps[1].max() == 0 and maps[2].max() == 0


def test_flipping_heatmaps_matches_flipping_points():
    rng = np.random.default_rng(1)
    pts = rng.uniform(8, 56, (16, 2))
    maps, _ = CODEC.encode(pts, np.ones(16))
    flipped, _ = CODEC.decode(flip_heatmaps(torch.from_numpy(maps)[None], MPII_FLIP_PAIRS))
    expected = flip_points(pts, 64, MPII_FLIP_PAIRS)
    direct, _ = CODEC.decode(torch.from_numpy(CODEC.encode(expected, np.ones(16))[0])[None])
    assert torch.allclose(flipped, direct)


def test_flip_test_leaves_a_symmetric_prediction_unchanged():
    # a mirror-symmetric pose: left joints mirror right ones, central joints on the axis
    pts = np.zeros((16, 2))
    for r, l in MPII_FLIP_PAIRS:
        pts[r] = [20.0 + r, 10.0 + 3 * r]
        pts[l] = [63 - pts[r][0], pts[r][1]]
    for c in (6, 7, 8, 9):
        pts[c] = [31.5, 10.0 + 5 * c]
    maps = torch.from_numpy(CODEC.encode(pts, np.ones(16))[0])[None]
    image = torch.rand(1, 3, 64, 64)
    image = 0.5 * (image + image.flip(-1))  # a symmetric input
    predict = lambda x: maps.expand(x.shape[0], -1, -1, -1)  # noqa: E731
    averaged = flip_test(predict, image, MPII_FLIP_PAIRS)
    assert torch.allclose(averaged, maps, atol=1e-6)
    assert torch.equal(CODEC.decode(averaged)[0], CODEC.decode(maps)[0])


def test_crop_geometry_maps_the_box_onto_the_crop_and_warps_pixels_consistently():
    m = crop_matrix(np.array([50.0, 40.0]), 0.5, 0.0, 100)  # a 100 px box -> 100 px crop: identity shift
    assert np.allclose(apply_affine(np.array([[50.0, 40.0]]), m), [[49.5, 49.5]])
    assert np.allclose(apply_affine(apply_affine(np.array([[3.0, 7.0]]), m), invert_affine(m)), [[3.0, 7.0]])
    from PIL import Image

    img = Image.new("RGB", (120, 90))
    img.putpixel((30, 20), (255, 255, 255))
    m = crop_matrix(np.array([60.0, 45.0]), 0.6, 25.0, 120)  # rotated, same zoom
    out = np.asarray(warp(img, m, 120)).sum(-1)
    y, x = np.unravel_index(out.argmax(), out.shape)
    expected = apply_affine(np.array([[30.0, 20.0]]), m)[0]
    assert abs(x - expected[0]) <= 0.5 and abs(y - expected[1]) <= 0.5


def test_synthetic_set_is_deterministic_per_seed_and_index():
    cfg = SyntheticConfig(train=4, valid=2, seed=7)
    a_img, a_rec = generate(cfg, "train", 3)
    b_img, b_rec = generate(cfg, "train", 3)
    assert a_rec == b_rec and np.array_equal(np.asarray(a_img), np.asarray(b_img))
    c_img, c_rec = generate(SyntheticConfig(train=4, valid=2, seed=8), "train", 3)
    assert c_rec != a_rec
    assert generate(cfg, "valid", 3)[1] != a_rec


def test_synthetic_left_and_right_limbs_look_different():
    cfg = SyntheticConfig(occluder_prob=0.0, truncation_prob=0.0, distractors=0)
    votes = []
    for i in range(40):
        img, joints, labeled = render(np.random.default_rng([99, i]), cfg)
        arr = np.asarray(img, dtype=np.float64)
        for (a, b), side in (((13, 14), "left"), ((12, 11), "right"), ((3, 4), "left"), ((2, 1), "right")):
            x, y = np.round((joints[a] + joints[b]) / 2).astype(int)
            r, _, bl = arr[y, x]
            votes.append((r > bl) == (side == "left"))
    assert np.mean(votes) > 0.8  # warm left limbs, cool right limbs (limbs can cross each other)


def test_the_real_mpii_loader_reads_the_synthetic_set(tmp_path):
    root = write_synthetic_mpii(tmp_path / "syn", SyntheticConfig(train=12, valid=5, truncation_prob=0.5))
    train, valid = read_mpii(root, "train"), read_mpii(root, "valid")
    assert len(train) == 12 and len(valid) == 5 and all(r.head_box is not None for r in valid)
    raw = json.loads((root / "annot" / "train.json").read_text())
    assert any(0 in r["joints_vis"] for r in raw)  # truncation leaves unlabeled joints
    for rec, r in zip(train, raw):  # 1-based in the file, 0-based in memory
        v = np.asarray(r["joints_vis"], dtype=bool)
        assert np.allclose(rec.joints[v], np.asarray(r["joints"])[v] - 1)
    ds = PoseDataset(train, root / "images", CODEC, MPII_FLIP_PAIRS, None)
    for i in range(len(ds)):
        item = ds[i]
        coords, _ = CODEC.decode(item["target"][None])
        back = apply_affine(coords[0].numpy(), invert_affine(item["crop"].numpy()))
        crop_pts = apply_affine(train[i].joints, item["crop"].numpy())
        inner = (item["weight"].numpy() > 0) & np.all((crop_pts > 6) & (crop_pts < 58), axis=1)
        px = train[i].scale * 200 / 64 * CODEC.stride  # image pixels per heatmap pixel
        assert np.abs(back - train[i].joints)[inner].max() <= 0.25 * px + 1e-6
    # written once: a second call with the same config is a no-op, another folder's data is never replaced
    assert write_synthetic_mpii(root, SyntheticConfig(train=12, valid=5, truncation_prob=0.5)) == root
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="not a bnnctl synthetic dataset"):
        write_synthetic_mpii(tmp_path / "mine", SyntheticConfig(train=2, valid=2))


def test_augmentation_is_deterministic_and_flip_swaps_joints(tmp_path):
    root = write_synthetic_mpii(tmp_path / "syn", SyntheticConfig(train=4, valid=1, truncation_prob=0.0))
    recs = read_mpii(root, "train")
    ds = PoseDataset(recs, root / "images", CODEC, MPII_FLIP_PAIRS, AugmentConfig(flip=True), seed=3)
    ds.set_epoch(2)
    a, b = ds[1], ds[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
    ds.set_epoch(3)
    assert not torch.equal(ds[1]["image"], a["image"])
    # whatever the augmentation, the crop matrix maps each labeled joint to its heatmap peak
    flips = 0
    for epoch in range(6):
        ds.set_epoch(epoch)
        item = ds[0]
        joints = apply_affine(recs[0].joints, item["crop"].numpy())
        if ds.sample_params(0)[2]:  # mirrored: the left joint's channel now holds the right joint
            joints = joints[[dict(MPII_FLIP_PAIRS + tuple((b, a) for a, b in MPII_FLIP_PAIRS)).get(j, j) for j in range(16)]]
        coords, _ = CODEC.decode(item["target"][None])
        w = item["weight"].numpy() > 0
        assert np.abs(coords[0].numpy() - joints)[w].max() <= CODEC.stride * 0.75
        flips += ds.sample_params(0)[2]
    assert 0 < flips < 6


def _write_mpii(root, records, name="train.json"):
    (root / "annot").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    (root / "annot" / name).write_text(json.dumps(records))


GOOD = {"image": "a.jpg", "center": [50, 60], "scale": 1.0, "joints": [[10, 10]] * 16, "joints_vis": [1] * 16}


def test_missing_dataset_names_the_layout_and_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        read_mpii(tmp_path / "nowhere", "train")
    msg = str(err.value)
    assert "annot/train.json" in msg and "images/" in msg and "bnnctl data synth" in msg


@pytest.mark.parametrize("bad,words", [
    ({**GOOD, "joints": [[1, 2]] * 15}, "16 [x, y] pairs"),
    ({**GOOD, "joints_vis": [2] * 16}, "'joints_vis'"),
    ({k: v for k, v in GOOD.items() if k != "center"}, "missing key 'center'"),
    ({**GOOD, "scale": -1}, "'scale' must be a positive number"),
    ("not a record", "expected an object"),
])
def test_malformed_record_names_file_and_index(tmp_path, bad, words):
    _write_mpii(tmp_path, [GOOD, GOOD, bad])
    _write_mpii(tmp_path, [GOOD], "valid.json")
    with pytest.raises(DataError) as err:
        read_mpii(tmp_path, "train")
    assert "train.json: record 2:" in str(err.value) and words in str(err.value)


def test_not_json_names_the_file(tmp_path):
    _write_mpii(tmp_path, [GOOD], "valid.json")
    (tmp_path / "annot" / "train.json").write_text("{broken")
    with pytest.raises(DataError, match="train.json is not valid JSON"):
        read_mpii(tmp_path, "train")


def test_head_boxes_from_gt_valid_mat(tmp_path):
    _write_mpii(tmp_path, [GOOD])
    _write_mpii(tmp_path, [GOOD, GOOD], "valid.json")
    with pytest.raises(DataError, match="head_box"):
        read_mpii(tmp_path, "valid")
    boxes = np.zeros((2, 2, 2))
    boxes[:, 0, :] = [[11, 21], [31, 41]]  # x1 per person / y1 per person
    boxes[:, 1, :] = [[21, 41], [51, 71]]
    savemat(tmp_path / "annot" / "gt_valid.mat", {"headboxes_src": boxes})
    valid = read_mpii(tmp_path, "valid")
    assert valid[0].head_box == (10.0, 30.0, 20.0, 50.0) and valid[1].head_box == (20.0, 40.0, 40.0, 70.0)


def test_lsp_reader_both_formats(tmp_path):
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    joints = np.concatenate([rng.uniform(10, 100, (2, 14, 1002)), np.zeros((1, 14, 1002))])  # LSP: 3 x 14 x N
    savemat(tmp_path / "joints.mat", {"joints": joints})
    train, test = read_lsp(tmp_path, "train"), read_lsp(tmp_path, "test")
    assert len(train) == 1000 and len(test) == 2 and test[0].image == "im1001.jpg"
    assert np.allclose(train[0].joints, joints[:2, :, 0].T - 1)
    ext = np.concatenate([rng.uniform(10, 100, (14, 2, 3)), np.ones((14, 1, 3))], axis=1)  # LSPET: 14 x 3 x N
    savemat(tmp_path / "joints.mat", {"joints": ext})
    recs = read_lsp(tmp_path)
    assert len(recs) == 3 and recs[2].image == "im00003.jpg" and LSP_FLIP_PAIRS[0] == (0, 5)
    savemat(tmp_path / "joints.mat", {"joints": np.zeros((5, 5, 5))})
    with pytest.raises(DataError, match="3 x 14 x N"):
        read_lsp(tmp_path)


def test_lsp_in_mpii_layout_interpolates_pelvis_and_thorax():
    from bnnctl.workers.data.pose import LSP_IN_MPII, MPII_JOINTS, LSP_JOINTS, PoseRecord, lsp_as_mpii

    pts = np.arange(28, dtype=np.float64).reshape(14, 2)
    vis = np.ones(14, dtype=np.float32)
    vis[LSP_JOINTS.index("l_shoulder")] = 0
    (m,) = lsp_as_mpii([PoseRecord("im0001.jpg", (5.0, 5.0), 1.0, pts, vis)])
    assert m.joints.shape == (16, 2) and len(MPII_JOINTS) == 16
    for i, name in enumerate(LSP_JOINTS):  # every LSP joint where MPII keeps it (neck = upper neck)
        assert MPII_JOINTS[LSP_IN_MPII[i]] == ("upper_neck" if name == "neck" else name)
        assert (m.joints[LSP_IN_MPII[i]] == pts[i]).all() and m.visible[LSP_IN_MPII[i]] == vis[i]
    hips = (pts[LSP_JOINTS.index("r_hip")] + pts[LSP_JOINTS.index("l_hip")]) / 2
    assert (m.joints[MPII_JOINTS.index("pelvis")] == hips).all() and m.visible[MPII_JOINTS.index("pelvis")] == 1
    # the thorax interpolates the shoulders; one of them unlabeled leaves it unlabeled
    assert m.visible[MPII_JOINTS.index("thorax")] == 0
