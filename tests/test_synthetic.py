"""Synthetic RGB-D streaming scenes: geometry, labels, superpoints, determinism, dataset, cache."""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import pytest
import torch

from esam.data import (
    CLASS_NAMES,
    FrameData,
    Primitives,
    SceneSequence,
    SyntheticSceneConfig,
    SyntheticStreamingDataset,
    cast_rays,
    frame_instances,
    generate_scene,
    look_at,
    pinhole_intrinsics,
    pixel_rays,
    render_depth,
    render_frame,
    sample_window,
    scene_seed,
    train_val_split,
)
from esam.data.raycast import ROOM_FACES
from esam.data.synthetic import SceneLayout, make_layout

SMALL = SyntheticSceneConfig(height=48, width=64, num_frames=4)
EXACT = dataclasses.replace(SMALL, depth_noise_base=0.0, depth_noise_quad=0.0)


def _frames_equal(a: FrameData, b: FrameData) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in
               ("points", "colors", "semantic", "instance", "superpoints", "pose", "intrinsics")) \
        and a.frame_index == b.frame_index


def _scenes_equal(a: SceneSequence, b: SceneSequence) -> bool:
    return a.scene_id == b.scene_id and a.class_names == b.class_names \
        and torch.equal(a.instance_labels, b.instance_labels) and len(a.frames) == len(b.frames) \
        and all(_frames_equal(x, y) for x, y in zip(a.frames, b.frames))


@pytest.fixture(scope="module")
def scenes() -> list[SceneSequence]:
    return [generate_scene(s) for s in range(3)]


# ----------------------------------------------------------------------------- determinism

def test_same_seed_identical_tensors():
    a, b = generate_scene(11, SMALL), generate_scene(11, SMALL)
    assert _scenes_equal(a, b)


def test_different_seeds_differ():
    a, b = generate_scene(11, SMALL), generate_scene(12, SMALL)
    assert not torch.equal(a.frames[0].pose, b.frames[0].pose)


# ----------------------------------------------------------------------------- labels

def test_class_and_instance_consistency(scenes):
    for scene in scenes:
        c = scene.num_classes
        assert scene.ignore_index == c == len(CLASS_NAMES)
        for f in scene.frames:
            inst = f.instance
            has = inst >= 0
            # every point of an instance carries that instance's class
            assert torch.equal(f.semantic[has], scene.instance_labels[inst[has]])
            # floor, walls and the unlabeled ceiling belong to no instance
            stuff = (f.semantic == 0) | (f.semantic == 1) | (f.semantic == c)
            assert bool((inst[stuff] == -1).all())
            assert bool((stuff | has).all())
            assert int(f.semantic.min()) >= 0 and int(f.semantic.max()) <= c
            assert int(inst.max()) < scene.num_instances


def test_object_counts_and_classes():
    counts, classes = [], set()
    for s in range(8):
        layout, _ = make_layout(torch.Generator().manual_seed(s), SyntheticSceneConfig())
        counts.append(layout.instance_labels.numel())
        classes.update(layout.instance_labels.tolist())
    assert all(5 <= k <= 30 for k in counts)
    assert len(classes) >= 8 and min(classes) >= 2


def test_frame_instances_local_ids(scenes):
    scene = scenes[0]
    f = scene.frames[0]
    ids, labels, global_ids = frame_instances(f, scene.instance_labels)
    assert labels.shape == global_ids.shape == (f.num_instances,)
    has = f.instance >= 0
    assert torch.equal(global_ids[ids[has]], f.instance[has])
    assert bool((ids[~has] == -1).all())
    assert torch.equal(labels, scene.instance_labels[global_ids])


# ----------------------------------------------------------------------------- geometry

def _room(seed: int, config: SyntheticSceneConfig) -> torch.Tensor:
    layout, _ = make_layout(torch.Generator().manual_seed(seed), config)
    return layout.room_size


@pytest.mark.parametrize("config", [EXACT, SMALL])
def test_points_inside_room(config):
    """Within 1e-4 without depth noise; within 5 noise std (which grows with depth) with it."""
    for seed in range(3):
        scene = generate_scene(seed, config)
        size = _room(seed, config)
        for f in scene.frames:
            depth = (f.points - f.pose[:3, 3]) @ f.pose[:3, 2]  # camera-frame z
            sigma = config.depth_noise_base + config.depth_noise_quad * depth ** 2
            tol = (1e-4 + 5 * sigma)[:, None]
            assert bool((f.points >= -tol).all()) and bool((f.points <= size + tol).all())


def test_points_reproject_to_their_pixels(scenes):
    """Depth noise moves points along their pixel ray only: projecting back hits the pixel."""
    cfg = SyntheticSceneConfig()
    for f in scenes[0].frames:
        rot, t = f.pose[:3, :3].double(), f.pose[:3, 3].double()
        cam = (f.points.double() - t) @ rot  # world -> camera: R^T (p - t)
        assert bool((cam[:, 2] > 0).all())
        uv = cam @ f.intrinsics.double().T
        uv = uv[:, :2] / uv[:, 2:]
        u, v = f.pixel_index % cfg.width, f.pixel_index // cfg.width
        assert torch.allclose(uv[:, 0], u.double(), atol=1e-3)
        assert torch.allclose(uv[:, 1], v.double(), atol=1e-3)


def _empty_room(size=(4.0, 4.0, 3.0)) -> SceneLayout:
    return SceneLayout(
        room_size=torch.tensor(size), primitives=Primitives(),
        prim_instance=torch.zeros(0, dtype=torch.long), prim_class=torch.zeros(0, dtype=torch.long),
        prim_color=torch.zeros(0, 3), room_color=torch.rand(6, 3),
        instance_labels=torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize("distance", [2.0, 0.75, 3.5])
def test_camera_facing_wall_hand_case(distance):
    """A camera at distance d from the wall x = 4, looking along +x: the centre pixel has depth d,
    every pixel on that wall has depth d (a fronto-parallel plane) and its points lie on x = 4."""
    layout = _empty_room()
    h, w = 33, 45  # odd sizes: the principal point is the centre pixel (16, 22)
    k = pinhole_intrinsics(h, w, 60.0)
    eye = torch.tensor([4.0 - distance, 2.0, 1.5])
    pose = look_at(eye, eye + torch.tensor([1.0, 0.0, 0.0]))
    depth, hit = render_depth(layout, pose, k, h, w)
    wall = ROOM_FACES.index("wall_x1")
    assert int(hit[16, 22]) == wall
    assert float(depth[16, 22]) == pytest.approx(distance, abs=1e-5)
    on_wall = hit == wall
    assert int(on_wall.sum()) > 0.3 * h * w
    assert torch.allclose(depth[on_wall], torch.full_like(depth[on_wall], distance), atol=1e-4)

    cfg = dataclasses.replace(EXACT, height=h, width=w, color_noise=0.0)
    frame = render_frame(layout, pose, k, cfg, torch.Generator().manual_seed(0))
    sel = hit.reshape(-1)[frame.pixel_index] == wall
    assert torch.allclose(frame.points[sel, 0], torch.full((int(sel.sum()),), 4.0), atol=1e-4)
    centre = frame.pixel_index == 16 * w + 22
    assert torch.allclose(frame.points[centre], torch.tensor([[4.0, 2.0, 1.5]]), atol=1e-5)
    assert bool((frame.semantic[sel] == 1).all()) and bool((frame.instance == -1).all())


def test_look_at_is_a_rotation_with_y_down():
    pose = look_at(torch.tensor([1.0, 2.0, 1.5]), torch.tensor([3.0, 5.0, 0.5])).double()
    rot = pose[:3, :3]
    assert torch.allclose(rot.T @ rot, torch.eye(3, dtype=torch.float64), atol=1e-6)
    assert float(torch.det(rot)) == pytest.approx(1.0, abs=1e-6)
    assert float(rot[2, 1]) < 0  # camera y points down in the world


# ----------------------------------------------------------------------------- ray caster

def test_cast_rays_hand_values():
    prims = Primitives(
        box_center=torch.tensor([[5.0, 0.0, 0.0]]), box_half=torch.tensor([[1.0, 1.0, 1.0]]),
        box_yaw=torch.tensor([math.pi / 4]),
        cyl_center=torch.tensor([[0.0, 5.0]]), cyl_z=torch.tensor([[-1.0, 1.0]]),
        cyl_radius=torch.tensor([1.0]),
        sph_center=torch.tensor([[0.0, 0.0, 5.0]]), sph_radius=torch.tensor([2.0]))
    o = torch.zeros(3)
    d = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, -1.0],
                      [0.0, 2.0, 0.0]])
    t, hit = cast_rays(o, d, prims)
    # a cube turned 45 degrees shows its edge at 5 - sqrt(2); unnormalised directions scale t
    expected = torch.tensor([5 - math.sqrt(2), 4.0, 3.0, float("inf"), 2.0])
    assert torch.allclose(t, expected)
    assert hit.tolist() == [0, 1, 2, -1, 1]
    # the top cap of the cylinder, seen from above
    t_cap, hit_cap = cast_rays(torch.tensor([0.0, 5.3, 4.0]), torch.tensor([[0.0, 0.0, -1.0]]),
                               prims)
    assert float(t_cap) == pytest.approx(3.0) and int(hit_cap) == 1


def _inside(points: np.ndarray, prims: Primitives) -> np.ndarray:
    """``(T, P)`` point-in-primitive tests straight from the definitions."""
    cols = []
    for c, h, yaw in zip(prims.box_center.double().numpy(), prims.box_half.double().numpy(),
                         prims.box_yaw.double().numpy()):
        rel = points - c
        rot = np.array([[math.cos(yaw), math.sin(yaw), 0.0],
                        [-math.sin(yaw), math.cos(yaw), 0.0], [0.0, 0.0, 1.0]])
        local = rel @ rot.T
        cols.append((np.abs(local) <= h).all(1))
    for c, z, r in zip(prims.cyl_center.double().numpy(), prims.cyl_z.double().numpy(),
                       prims.cyl_radius.double().numpy()):
        radial = ((points[:, :2] - c) ** 2).sum(1) <= r * r
        cols.append(radial & (points[:, 2] >= z[0]) & (points[:, 2] <= z[1]))
    for c, r in zip(prims.sph_center.double().numpy(), prims.sph_radius.double().numpy()):
        cols.append(((points - c) ** 2).sum(1) <= r * r)
    return np.stack(cols, 1) if cols else np.zeros((len(points), 0), dtype=bool)


def _march(origin: np.ndarray, direction: np.ndarray, prims: Primitives, room: np.ndarray,
           step: float) -> tuple[float, int]:
    """One ray, marched: the first sample inside a primitive or outside the room."""
    p = len(prims)
    ts = np.arange(1, int(12.0 / step)) * step
    pts = origin + ts[:, None] * direction
    inside = _inside(pts, prims)
    outside = ((pts < 0) | (pts > room)).any(1)
    first_prim = np.argmax(inside.any(1)) if inside.any() else len(ts)
    first_out = np.argmax(outside) if outside.any() else len(ts)
    if first_prim < first_out:
        return ts[first_prim], int(np.argmax(inside[first_prim]))
    if first_out < len(ts):
        q = pts[first_out]
        face = {(2, 0): 0, (2, 1): 1, (0, 0): 2, (0, 1): 3, (1, 0): 4, (1, 1): 5}
        axis = int(np.argmax(np.maximum(-q, q - room)))
        return ts[first_out], p + face[axis, int(q[axis] > room[axis])]
    return math.inf, -1


@pytest.mark.parametrize("seed", [0, 1])
def test_vectorised_caster_matches_per_ray_march(seed):
    cfg = SyntheticSceneConfig()
    g = torch.Generator().manual_seed(seed)
    layout, path = make_layout(g, cfg)
    room = layout.room_size.double().numpy()
    origin = path.eyes(3)[1].float()  # on the camera path: clear of furniture
    # aim rays at random primitive centres (to hit things) and in random directions
    p = len(layout.primitives)
    centres = torch.cat([layout.primitives.box_center,
                         torch.cat([layout.primitives.cyl_center,
                                    layout.primitives.cyl_z.mean(1, keepdim=True)], 1),
                         layout.primitives.sph_center])
    pick = torch.randperm(p, generator=g)[:12]
    dirs = torch.cat([centres[pick] - origin, torch.randn(6, 3, generator=g)])
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    t, hit = cast_rays(origin, dirs, layout.primitives, layout.room_size)
    t_dense, hit_dense = cast_rays(origin, dirs, layout.primitives, layout.room_size, cull=False)
    assert torch.equal(hit, hit_dense) and torch.equal(t, t_dense)
    # a ray grazing an edge may legitimately hit or miss within marching resolution: compare the
    # rays whose hit survives small perturbations of their direction
    jitter = 2e-3 * torch.randn(8, 3, generator=g)
    _, hit_jittered = cast_rays(origin, (dirs[:, None] + jitter).reshape(-1, 3),
                                layout.primitives, layout.room_size)
    stable = (hit_jittered.reshape(-1, 8) == hit[:, None]).all(1)
    assert int(stable.sum()) >= 14
    step = 2e-3
    for i in stable.nonzero().squeeze(1).tolist():
        t_ref, hit_ref = _march(origin.double().numpy(), dirs[i].double().numpy(),
                                layout.primitives, room, step)
        assert hit_ref == int(hit[i]), f"ray {i}"
        assert abs(t_ref - float(t[i])) <= step + 1e-4, f"ray {i}"


def test_culled_equals_dense_on_full_frames():
    cfg = SyntheticSceneConfig(height=48, width=64)
    layout, path = make_layout(torch.Generator().manual_seed(5), cfg)
    k = pinhole_intrinsics(cfg.height, cfg.width, cfg.hfov_deg)
    from esam.data.synthetic import camera_trajectory

    for pose in camera_trajectory(path, 3):
        o, d = pixel_rays(pose, k, cfg.height, cfg.width)
        t1, h1 = cast_rays(o, d, layout.primitives, layout.room_size)
        t2, h2 = cast_rays(o, d, layout.primitives, layout.room_size, cull=False)
        assert torch.equal(h1, h2) and torch.equal(t1, t2)


def test_cast_rays_rejects_bad_shapes():
    with pytest.raises(ValueError, match="directions"):
        cast_rays(torch.zeros(3), torch.zeros(5, 2), Primitives())
    with pytest.raises(ValueError, match="origin"):
        cast_rays(torch.zeros(2), torch.zeros(5, 3), Primitives())
    with pytest.raises(ValueError, match="box_half"):
        Primitives(box_center=torch.zeros(2, 3), box_half=torch.zeros(3, 3),
                   box_yaw=torch.zeros(2))


# ----------------------------------------------------------------------------- superpoints

def test_superpoints_never_span_two_instances_or_classes(scenes):
    for scene in scenes:
        for f in scene.frames:
            s = f.num_superpoints
            assert torch.equal(torch.unique(f.superpoints), torch.arange(s))  # contiguous
            for labels in (f.instance + 1, f.semantic):
                pairs = torch.unique(f.superpoints * (scene.num_classes + scene.num_instances + 2)
                                     + labels)
                assert pairs.numel() == s  # one label per superpoint


def test_superpoint_counts_are_plausible(scenes):
    cfg = SyntheticSceneConfig()
    for f in scenes[1].frames:
        sizes = torch.bincount(f.superpoints)
        assert 10 <= f.num_superpoints <= 400
        # small segments only where a part is barely visible
        assert float((sizes < cfg.min_superpoint_px).float().mean()) < 0.2


# ----------------------------------------------------------------------------- counts, options

def test_point_counts_in_range(scenes):
    cfg = SyntheticSceneConfig()
    for scene in scenes:
        assert scene.num_frames == cfg.num_frames
        for f in scene.frames:
            assert 5000 <= f.num_points <= cfg.height * cfg.width
            assert f.colors.min() >= 0 and f.colors.max() <= 1
            assert f.points.dtype == f.colors.dtype == torch.float32


def test_subsampling_and_image():
    cfg = dataclasses.replace(SMALL, max_points_per_frame=500, render_image=True)
    scene = generate_scene(3, cfg)
    for f in scene.frames:
        assert f.num_points == 500
        assert f.image.shape == (3, cfg.height, cfg.width)
        assert torch.equal(f.image.reshape(3, -1)[:, f.pixel_index], f.colors.T)
        assert torch.equal(torch.unique(f.superpoints), torch.arange(f.num_superpoints))


def test_no_ceiling_option():
    cfg = dataclasses.replace(SMALL, with_ceiling=False, camera_height=(1.6, 1.7))
    scene = generate_scene(4, cfg)
    assert all(int((f.semantic == scene.ignore_index).sum()) == 0 for f in scene.frames)


def test_config_validation():
    with pytest.raises(ValueError, match="min_objects"):
        SyntheticSceneConfig(min_objects=5, max_objects=3)
    with pytest.raises(ValueError, match="num_frames"):
        SyntheticSceneConfig(num_frames=0)
    with pytest.raises(ValueError, match="seed"):
        generate_scene(-1, SMALL)
    with pytest.raises(ValueError, match="seed"):
        generate_scene(2 ** 32, SMALL)  # would alias seed 0


def test_speed_at_default_resolution():
    """Loose bound (the measured rate on one core is reported in the docs / benchmarks)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate_scene(0)  # warm-up
        start = time.perf_counter()
        scene = generate_scene(1)
        fps = scene.num_frames / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    assert fps > 5.0


# ----------------------------------------------------------------------------- structures

def test_frame_data_validation_and_to():
    f = generate_scene(0, SMALL).frames[0]
    with pytest.raises(ValueError, match="colors"):
        dataclasses.replace(f, colors=f.colors[:-1])
    with pytest.raises(ValueError, match="semantic"):
        dataclasses.replace(f, semantic=f.semantic.int())
    moved = f.to("cpu")
    assert _frames_equal(moved, f)


def test_window_and_sample_window():
    scene = generate_scene(0, SMALL)
    clip = scene.window(1, 2)
    assert [f.frame_index for f in clip.frames] == [1, 2]
    assert SyntheticStreamingDataset.window(scene, 0, 4).num_frames == 4
    with pytest.raises(ValueError, match="window"):
        scene.window(3, 2)
    clip = sample_window(scene, 3, torch.Generator().manual_seed(0))
    idx = [f.frame_index for f in clip.frames]
    assert len(idx) == 3 and idx == list(range(idx[0], idx[0] + 3))


# ----------------------------------------------------------------------------- dataset, cache

def test_dataset_items_are_seeded_scenes():
    ds = SyntheticStreamingDataset(3, seed=7, config=SMALL)
    scene = ds[2]
    ref = generate_scene(scene_seed(7, 2), SMALL, scene_id=scene.scene_id)
    assert _scenes_equal(scene, ref)
    with pytest.raises(IndexError):
        ds[3]


def test_frames_per_scene_override():
    ds = SyntheticStreamingDataset(1, config=SMALL, frames_per_scene=2)
    assert ds[0].num_frames == 2


def test_train_val_seeds_never_overlap():
    train, val = train_val_split(50, 50, seed=3, config=SMALL)
    train_seeds = {train.scene_seed(i) for i in range(len(train))}
    val_seeds = {val.scene_seed(i) for i in range(len(val))}
    assert not train_seeds & val_seeds
    test = SyntheticStreamingDataset(50, seed=3, stream=2)
    assert not {test.scene_seed(i) for i in range(50)} & (train_seeds | val_seeds)
    # the boundary cases of the stream ranges
    assert scene_seed(3, 2 ** 30 - 1, 0) != scene_seed(3, 0, 1)
    assert scene_seed(0, 5) == 5 and scene_seed(1, 0) != scene_seed(2, 0)
    with pytest.raises(ValueError, match="index"):
        scene_seed(0, 2 ** 30)
    assert not torch.equal(train[0].frames[0].points[:10], val[0].frames[0].points[:10])


def test_cache_round_trip(tmp_path, monkeypatch):
    ds = SyntheticStreamingDataset(2, seed=1, config=SMALL, cache_dir=tmp_path)
    first = ds[1]
    path = ds.cache_path(1)
    assert path.exists() and path.parent == tmp_path
    again = SyntheticStreamingDataset(2, seed=1, config=SMALL, cache_dir=tmp_path)

    def fail(*args, **kwargs):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(again, "_generate", fail)
    cached = again[1]
    assert _scenes_equal(first, cached)
    assert torch.equal(first.frames[0].pixel_index, cached.frames[0].pixel_index)
    # another config never reuses the entry
    other = SyntheticStreamingDataset(2, seed=1, config=dataclasses.replace(SMALL, width=66),
                                      cache_dir=tmp_path)
    assert other.cache_key(1) != ds.cache_key(1)


def test_cache_recovers_from_a_corrupt_entry(tmp_path):
    ds = SyntheticStreamingDataset(1, config=SMALL, cache_dir=tmp_path)
    ds.cache_path(0).parent.mkdir(parents=True, exist_ok=True)
    ds.cache_path(0).write_bytes(b"not a torch file")
    assert _scenes_equal(ds[0], ds._generate(0))


def test_empty_room_has_no_instances():
    cfg = dataclasses.replace(SMALL, min_objects=0, max_objects=0)
    scene = generate_scene(2, cfg)
    assert scene.num_instances == 0
    for f in scene.frames:
        assert bool((f.instance == -1).all()) and f.num_instances == 0
        assert set(f.semantic.unique().tolist()) <= {0, 1, scene.ignore_index}
        ids, labels, global_ids = frame_instances(f, scene.instance_labels)
        assert labels.numel() == 0 and bool((ids == -1).all())
