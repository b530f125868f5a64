"""ESAM ScanNet-format loader: files written in the exact on-disk format are read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from esam.data import (
    SCANNET_INTRINSICS,
    ScanNetLabelSpace,
    ScanNetMVDataset,
    load_scannet_frame,
    load_scannet_scene,
    read_mask_bin,
    read_points_bin,
    read_pose,
    scannet200_labels,
    scannet20_labels,
    scannet_frame_ids,
)

SCENE = "scene0011_00"


def write_frame(root: Path, scene: str, frame: int, rng: np.random.Generator, *, n: int = 50,
                raw_ids: tuple[int, ...] = (0, 3, 5, 7), nyu: tuple[int, ...] = (0, 1, 5, 5),
                layout: str = "mv") -> dict[str, np.ndarray]:
    """Write one frame the way ESAM's converters do: ``ndarray.tofile`` of float32 (n, 6) points
    and int64 (n,) masks, and the 4 x 4 pose as text."""
    pts = np.concatenate([rng.uniform(-2, 4, (n, 3)), rng.integers(0, 256, (n, 3))], 1)
    pts = pts.astype(np.float32)
    pick = rng.integers(0, len(raw_ids), n)
    inst = np.asarray(raw_ids, dtype=np.int64)[pick]
    sem = np.asarray(nyu, dtype=np.int64)[pick]  # semantic follows the object, as ESAM derives it
    sp = rng.integers(0, 7, n).astype(np.int64) * 3  # ids with gaps, to test renumbering
    pose = np.eye(4)
    pose[:3, :3] = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    pose[:3, 3] = rng.normal(size=3)
    name = f"{frame}.bin" if layout == "mv" else f"{scene}_{frame}.bin"
    sub = scene if layout == "mv" else ""
    for folder, arr in (("points", pts), ("semantic_mask", sem), ("instance_mask", inst),
                        ("super_points", sp)):
        (root / folder / sub).mkdir(parents=True, exist_ok=True)
        arr.tofile(root / folder / sub / name)
    if layout == "mv":
        (root / "2D" / scene / "pose").mkdir(parents=True, exist_ok=True)
        np.savetxt(root / "2D" / scene / "pose" / f"{frame}.txt", pose)
    else:
        (root / "pose_centered" / scene).mkdir(parents=True, exist_ok=True)
        np.save(root / "pose_centered" / scene / f"{frame}.npy", pose)
    return {"points": pts, "semantic": sem, "instance": inst, "superpoints": sp, "pose": pose}


@pytest.fixture()
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def test_frame_round_trip(tmp_path, rng):
    raw = write_frame(tmp_path, SCENE, 40, rng)
    f = load_scannet_frame(tmp_path, SCENE, 40)
    n = raw["points"].shape[0]
    assert f.num_points == n and f.frame_index == 40
    assert torch.equal(f.points, torch.from_numpy(raw["points"][:, :3]))
    assert torch.allclose(f.colors, torch.from_numpy(raw["points"][:, 3:] / 255.0).float())
    assert torch.allclose(f.pose, torch.from_numpy(raw["pose"]).float(), atol=1e-6)
    fx, fy, cx, cy = SCANNET_INTRINSICS
    assert torch.allclose(f.intrinsics, torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]]))
    # NYU40 ids -> ScanNet-20 indices: 1 wall -> 0, 5 chair -> 4, 0 unannotated -> 20 (ignore)
    expected_sem = {0: 20, 1: 0, 5: 4}
    for i in range(n):
        assert int(f.semantic[i]) == expected_sem[int(raw["semantic"][i])]
        # no object, unlabeled and wall points belong to no instance; others keep the object id
        keeps = raw["instance"][i] != 0 and raw["semantic"][i] not in (0, 1, 2)
        assert int(f.instance[i]) == (int(raw["instance"][i]) if keeps else -1)
    # superpoints renumbered to [0, S) in the same order
    sp = raw["superpoints"]
    assert torch.equal(f.superpoints, torch.from_numpy(np.unique(sp, return_inverse=True)[1]))
    assert torch.equal(torch.unique(f.superpoints), torch.arange(f.num_superpoints))


def test_scene_renumbers_instances_consistently(tmp_path, rng):
    raws = [write_frame(tmp_path, SCENE, fr, rng, raw_ids=ids, nyu=nyu)
            for fr, ids, nyu in ((0, (0, 9, 4), (0, 5, 39)), (20, (9, 12, 4, 2), (5, 7, 39, 1)),
                                 (40, (12, 30), (7, 7)))]
    scene = load_scannet_scene(tmp_path, SCENE)
    assert [f.frame_index for f in scene.frames] == [0, 20, 40]
    # object ids 4 (otherfurniture), 9 (chair), 12 (table), 30 (table); 2 is a wall
    assert scene.num_instances == 4
    assert scene.instance_labels.tolist() == [19, 4, 6, 6]
    new_id = {4: 0, 9: 1, 12: 2, 30: 3}
    for f, raw in zip(scene.frames, raws):
        for i in range(f.num_points):
            want = new_id.get(int(raw["instance"][i]), -1)
            assert int(f.instance[i]) == want
        has = f.instance >= 0
        assert torch.equal(f.semantic[has], scene.instance_labels[f.instance[has]])
    assert scene.class_names[0] == "wall" and scene.ignore_index == 20


def test_frame_filters_and_dataset(tmp_path, rng):
    for fr in (0, 20, 40, 60, 80, 100, 120):
        write_frame(tmp_path, SCENE, fr, rng, n=10)
    write_frame(tmp_path, "scene0001_00", 0, rng, n=10)
    assert scannet_frame_ids(tmp_path, SCENE) == ["0", "20", "40", "60", "80", "100", "120"]
    assert scannet_frame_ids(tmp_path, SCENE, frame_id_multiple=40) == ["0", "40", "80", "120"]
    (tmp_path / "meta_data").mkdir()
    (tmp_path / "meta_data" / "scannetv2_val.txt").write_text(f"{SCENE}\nscene0001_00\n")
    ds = ScanNetMVDataset(tmp_path, "val", frame_id_multiple=40, max_frames=3)
    assert len(ds) == 2
    scene = ds[0]
    assert scene.scene_id == SCENE and [f.frame_index for f in scene.frames] == [0, 40, 80]
    assert ScanNetMVDataset(tmp_path, scene_ids=["scene0001_00"])[0].num_frames == 1
    with pytest.raises(FileNotFoundError):
        ScanNetMVDataset(tmp_path, "train")


def test_axis_align_and_sv_layout(tmp_path, rng):
    raw = write_frame(tmp_path, SCENE, 0, rng)
    align = np.eye(4)
    align[:3, :3] = [[0, -1, 0], [1, 0, 0], [0, 0, 1]]
    align[:3, 3] = [1.0, 2.0, 0.5]
    (tmp_path / "axis_align_matrix").mkdir()
    np.save(tmp_path / "axis_align_matrix" / f"{SCENE}.npy", align)
    f = load_scannet_frame(tmp_path, SCENE, 0, axis_align=True)
    xyz = raw["points"][:, :3].astype(np.float64)
    assert torch.allclose(f.points.double(), torch.from_numpy(xyz @ align[:3, :3].T + align[:3, 3]),
                          atol=1e-5)
    assert torch.allclose(f.pose.double(), torch.from_numpy(align @ raw["pose"]), atol=1e-5)

    sv = tmp_path / "sv"
    raw_sv = write_frame(sv, SCENE, 200, rng, layout="sv")
    f_sv = load_scannet_frame(sv, SCENE, 200, layout="sv")
    assert torch.equal(f_sv.points, torch.from_numpy(raw_sv["points"][:, :3]))
    assert torch.allclose(f_sv.pose.double(), torch.from_numpy(raw_sv["pose"]), atol=1e-6)


def test_label_spaces():
    l20, l200 = scannet20_labels(), scannet200_labels()
    assert l20.num_classes == 20 and l200.num_classes == 200
    raw = torch.tensor([0, 1, 2, 39, 40, -3, 10_000])
    assert l20.map_semantic(raw).tolist() == [20, 0, 1, 19, 20, 20, 20]
    assert l200.map_semantic(torch.tensor([1, 2, 1191, 12])).tolist() == [0, 1, 199, 200]
    with pytest.raises(ValueError, match="valid_class_ids"):
        ScanNetLabelSpace(class_names=("a", "b"), valid_class_ids=(1,))


def test_missing_pose(tmp_path, rng):
    write_frame(tmp_path, SCENE, 0, rng)
    (tmp_path / "2D" / SCENE / "pose" / "0.txt").unlink()
    with pytest.raises(FileNotFoundError, match="pose"):
        load_scannet_frame(tmp_path, SCENE, 0)
    f = load_scannet_frame(tmp_path, SCENE, 0, require_pose=False)
    assert torch.equal(f.pose, torch.eye(4))


# ----------------------------------------------------------------------------- bad files

def test_points_of_wrong_width_name_the_file(tmp_path, rng):
    write_frame(tmp_path, SCENE, 0, rng, n=7)
    path = tmp_path / "points" / SCENE / "0.bin"
    np.zeros(7 * 5, dtype=np.float32).tofile(path)  # (n, 5): not (n, 6)
    with pytest.raises(ValueError, match=r"points.*0\.bin.*\(n, 6\)"):
        load_scannet_frame(tmp_path, SCENE, 0)


def test_points_of_wrong_dtype_name_the_file(tmp_path, rng):
    raw = write_frame(tmp_path, SCENE, 0, rng, n=40)
    path = tmp_path / "points" / SCENE / "0.bin"
    raw["points"].astype(np.float64).tofile(path)
    with pytest.raises(ValueError, match=str(SCENE)):
        load_scannet_frame(tmp_path, SCENE, 0)


def test_int32_mask_names_the_file(tmp_path, rng):
    raw = write_frame(tmp_path, SCENE, 0, rng, n=12)
    path = tmp_path / "instance_mask" / SCENE / "0.bin"
    raw["instance"].astype(np.int32).tofile(path)
    with pytest.raises(ValueError, match=r"instance_mask.*0\.bin.*\(12,\)"):
        load_scannet_frame(tmp_path, SCENE, 0)
    raw["instance"][:3].astype(np.int32).tofile(path)  # 12 bytes: not whole int64 values
    with pytest.raises(ValueError, match=r"instance_mask.*0\.bin.*int64"):
        load_scannet_frame(tmp_path, SCENE, 0)


def test_superpoints_of_wrong_length_name_the_file(tmp_path, rng):
    write_frame(tmp_path, SCENE, 0, rng, n=12)
    np.arange(13, dtype=np.int64).tofile(tmp_path / "super_points" / SCENE / "0.bin")
    with pytest.raises(ValueError, match=r"super_points.*0\.bin"):
        load_scannet_frame(tmp_path, SCENE, 0)


def test_bad_pose_names_the_file(tmp_path, rng):
    write_frame(tmp_path, SCENE, 0, rng)
    pose_path = tmp_path / "2D" / SCENE / "pose" / "0.txt"
    np.savetxt(pose_path, np.eye(3))
    with pytest.raises(ValueError, match=r"0\.txt.*\(4, 4\)"):
        load_scannet_frame(tmp_path, SCENE, 0)
    bad = np.eye(4)
    bad[0, 0] = -np.inf  # ScanNet marks lost tracking with -inf poses
    np.savetxt(pose_path, bad)
    with pytest.raises(ValueError, match=r"0\.txt.*finite"):
        load_scannet_frame(tmp_path, SCENE, 0)


def test_readers_directly(tmp_path):
    pts = np.arange(12, dtype=np.float32).reshape(2, 6)
    pts.tofile(tmp_path / "p.bin")
    assert torch.equal(read_points_bin(tmp_path / "p.bin"), torch.from_numpy(pts))
    np.array([3, 1], dtype=np.int64).tofile(tmp_path / "m.bin")
    assert read_mask_bin(tmp_path / "m.bin", 2).tolist() == [3, 1]
    np.array([-1, 1], dtype=np.int64).tofile(tmp_path / "neg.bin")
    with pytest.raises(ValueError, match="neg.bin"):
        read_mask_bin(tmp_path / "neg.bin")
    np.save(tmp_path / "pose.npy", np.eye(4, dtype=np.float32))
    assert torch.equal(read_pose(tmp_path / "pose.npy"), torch.eye(4))
    np.array([1e30] * 6, dtype=np.float32).tofile(tmp_path / "big.bin")
    with pytest.raises(ValueError, match="big.bin.*RGB"):
        read_points_bin(tmp_path / "big.bin")
