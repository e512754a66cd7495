"""Vision analytics (pure): homography, point-in-polygon, dwell, lines, occupancy, heatmap, buckets."""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from edge_agent.clock import parse_rfc3339
from edge_agent.contract import TrafficHeatmapItem, TrafficStatsItem
from edge_agent.sync.compaction import merge_heatmap, merge_stats
from edge_agent.vision.analytics import (
    Track,
    TrafficAnalytics,
    TrafficAnalyticsConfig,
)
from edge_agent.vision.floor import Homography, Polygon, check_simple_polygon, foot_points, points_in_polygon

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z, a multiple of 60
PX_PER_M = 100.0  # the test camera looks straight down: 1 m on the floor is 100 px in the image
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- helpers


def config(**over: Any) -> TrafficAnalyticsConfig:
    base: dict[str, Any] = {
        "camera": "cam1",
        "homography": {
            "image": [[0, 0], [2000, 0], [2000, 2000], [0, 2000]],
            "floor": [[0, 0], [20, 0], [20, 20], [0, 20]],
        },
        "zones": {"shelf": [[2, 2], [6, 2], [6, 6], [2, 6]]},
        "lines": {"door": {"a": [8, 10], "b": [12, 10], "inside": [10, 5]}},
        "min_dwell_s": 5.0,
        "track_grace_s": 2.0,
        "zone_grace_s": 1.0,
        "line_hysteresis_m": 0.2,
        "heatmap": {"origin": [0, 0], "width_m": 20, "height_m": 20, "cell_m": 1.0},
        "dwell_edges_s": [10, 30, 60],
    }
    base.update(over)
    return TrafficAnalyticsConfig.model_validate(base)


def person(tid: int, x: float, y: float, conf: float = 0.9) -> Track:
    """A 1.7 m-ish box whose foot point lands on floor (x, y)."""
    u, v = x * PX_PER_M, y * PX_PER_M
    return Track(tid, (u - 20.0, v - 170.0, u + 20.0, v), conf)


def run(an: TrafficAnalytics, frames: list[tuple[float, list[Track]]]) -> None:
    for ts, tracks in frames:
        an.update(ts, tracks)


def walk(tid: int, pts: list[tuple[float, float]], t_start: float, dt: float) -> list[tuple[float, Track]]:
    return [(t_start + i * dt, person(tid, x, y)) for i, (x, y) in enumerate(pts)]


def frames_from(*walks: list[tuple[float, Track]]) -> list[tuple[float, list[Track]]]:
    by_ts: dict[float, list[Track]] = {}
    for w in walks:
        for ts, tr in w:
            by_ts.setdefault(ts, []).append(tr)
    return sorted(by_ts.items())


def flush_all(an: TrafficAnalytics, until: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    return an.flush(until)


def line_totals(stats: list[dict[str, Any]]) -> tuple[int, int]:
    cam = [s for s in stats if s["zone"] is None]
    return sum(s["entries"] for s in cam), sum(s["exits"] for s in cam)


# ---------------------------------------------------------------- homography


def _project(h: np.ndarray, pts: np.ndarray) -> np.ndarray:
    q = np.c_[pts, np.ones(len(pts))] @ h.T
    return q[:, :2] / q[:, 2:]


@st.composite
def projective(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    """A camera-like homography (image 640x480 -> floor metres, horizon well outside the image)
    and 4-10 calibration points spread over the image."""
    f = st.floats
    theta = draw(f(-math.pi, math.pi))
    scale = draw(f(0.005, 0.05))  # metres per pixel
    shear = draw(f(-0.3, 0.3))
    aspect = draw(f(0.5, 2.0))
    g, hh = draw(f(-5e-4, 5e-4)), draw(f(-5e-4, 5e-4))  # |g x + h y| <= 0.56 over the image: w > 0.4
    tx, ty = draw(f(-20, 20)), draw(f(-20, 20))
    c, s = math.cos(theta), math.sin(theta)
    a = scale * np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, aspect]])
    h = np.array([[a[0, 0], a[0, 1], tx], [a[1, 0], a[1, 1], ty], [g, hh, 1.0]])
    # Four points near the corners keep the fit well conditioned; extras go anywhere in the image.
    corners = np.array([[0, 0], [640, 0], [640, 480], [0, 480]], dtype=float)
    jit = np.array(draw(st.lists(st.tuples(f(20, 150), f(20, 150)), min_size=4, max_size=4)))
    sign = np.array([[1, 1], [-1, 1], [-1, -1], [1, -1]])
    extra = draw(st.lists(st.tuples(f(0, 640), f(0, 480)), max_size=6))
    img = corners + sign * jit
    for e in extra:  # a repeated calibration point is rejected (tested below), so keep them apart
        if np.hypot(*(img - e).T).min() > 5:
            img = np.vstack([img, e])
    return h, img


@FAST
@given(projective())
def test_homography_recovers_known_transform(case: tuple[np.ndarray, np.ndarray]) -> None:
    h_true, img = case
    flr = _project(h_true, img)
    h = Homography.from_points(img, flr)
    probe = np.array([[x, y] for x in np.linspace(0, 640, 9) for y in np.linspace(0, 480, 7)])
    expect = _project(h_true, probe)
    span = np.ptp(expect, axis=0).max()
    assert np.abs(h.to_floor(probe) - expect).max() <= 1e-7 * span
    assert np.abs(h.to_image(expect) - probe).max() <= 1e-6 * 640
    assert h.rms_error_m <= 1e-7 * span


def test_homography_least_squares_averages_noise() -> None:
    rng = np.random.default_rng(7)
    h_true = np.array([[0.02, 0.004, -3.0], [0.001, -0.03, 12.0], [1e-5, 3e-4, 1.0]])
    img = rng.uniform([0, 0], [640, 480], size=(40, 2))
    flr = _project(h_true, img) + rng.normal(0, 0.02, size=(40, 2))  # 2 cm survey error
    h = Homography.from_points(img, flr)
    probe = rng.uniform([0, 0], [640, 480], size=(100, 2))
    assert np.abs(h.to_floor(probe) - _project(h_true, probe)).max() < 0.03
    assert 0.01 < h.rms_error_m < 0.04


def test_foot_point_is_bottom_centre() -> None:
    assert foot_points([[10, 20, 30, 120]]).tolist() == [[20.0, 120.0]]


def _camera(yaw_deg: float, pitch_deg: float, height: float, focal: float, size=(640, 360)):
    """A pinhole camera over the floor: returns project((N, 3) floor points, z up) -> (N, 2) pixels."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    forward = np.array([math.sin(yaw) * math.cos(pitch), math.cos(yaw) * math.cos(pitch), -math.sin(pitch)])
    right = np.array([math.cos(yaw), -math.sin(yaw), 0.0])
    down = np.cross(forward, right)
    centre = np.array([2.0, -3.0, height])

    def project(pts: np.ndarray) -> np.ndarray:
        d = np.asarray(pts, dtype=np.float64) - centre
        z = d @ forward
        return np.stack([size[0] / 2 + focal * (d @ right) / z, size[1] / 2 + focal * (d @ down) / z], axis=1)
    return project


def _person_box(project, x: float, y: float, tall: float, cut: float = 0.0) -> tuple[float, float, float, float]:
    """The image box of a person as a 0.5 m wide slab facing the camera, from ``cut`` up to ``tall``."""
    c = project(np.array([[x - 0.25, y, cut], [x + 0.25, y, cut], [x - 0.25, y, tall], [x + 0.25, y, tall]]))
    return c[:, 0].min(), c[:, 1].min(), c[:, 0].max(), c[:, 1].max()


def _steep_camera(**overrides):
    """(project, analytics) for a camera 3.5 m up looking 35 degrees down over a 4 x 8 m floor, with its
    frame size given (so feet hidden are placed from heads) and a 0.25 m heatmap grid."""
    project = _camera(0.0, 35.0, 3.5, 420.0)
    floor = np.array([[0, 0], [4, 0], [4, 8], [0, 8]], dtype=np.float64)
    img = project(np.c_[floor, np.zeros(4)])
    cfg = config(homography={"image": img.tolist(), "floor": floor.tolist(), "image_size": [640, 360]},
                 heatmap={"origin": [0, 0], "width_m": 4, "height_m": 8, "cell_m": 0.25}, zones={}, lines={},
                 **overrides)
    return project, TrafficAnalytics(cfg)


@settings(max_examples=60, deadline=None)
@given(yaw=st.floats(-40, 40), pitch=st.floats(10, 80), height=st.floats(2.5, 6), focal=st.floats(250, 1200))
def test_vertical_vanishing_point_of_a_pinhole_camera(yaw: float, pitch: float, height: float, focal: float) -> None:
    project = _camera(yaw, pitch, height, focal)
    floor = np.array([[0, 2], [4, 2], [4, 8], [0, 8], [2, 5]], dtype=np.float64)
    h = Homography.from_points(project(np.c_[floor, np.zeros(len(floor))]), floor)
    up = h.uprights((320, 180))
    assert up is not None
    vp = up.vanishing_point
    assert vp is not None
    true = project(np.array([[2.0, 5.0, -1e7]]))[0]
    assert np.hypot(*(vp - true)) < 1e-3 * max(1.0, np.hypot(*(true - (320, 180))))


@settings(max_examples=40, deadline=None)
@given(yaw=st.floats(-40, 40), pitch=st.floats(15, 75), height=st.floats(2.5, 6), focal=st.floats(250, 1200),
       x=st.floats(0.5, 3.5), y=st.floats(2.5, 7.5), tall=st.floats(1.0, 2.0))
def test_heights_and_feet_of_upright_people(yaw: float, pitch: float, height: float, focal: float, x: float, y: float,
                                            tall: float) -> None:
    """From the floor calibration alone: how tall someone is from their feet and head, and where they
    stand from their head and height (when their feet are hidden)."""
    project = _camera(yaw, pitch, height, focal)
    floor = np.array([[0, 2], [4, 2], [4, 8], [0, 8], [2, 5]], dtype=np.float64)
    up = Homography.from_points(project(np.c_[floor, np.zeros(len(floor))]), floor).uprights((320, 180))
    assert up is not None
    head = project(np.array([[x, y, tall]]))
    assert up.height_of([[x, y]], head)[0] == pytest.approx(tall, abs=1e-3)
    assert up.foot_of(head, tall)[0] == pytest.approx([x, y], abs=1e-3)


@pytest.mark.parametrize("far_y, near_y, placed", [(4.6, 3.3, True), (7.4, 6.0, False)])
def test_a_person_whose_feet_are_hidden_is_placed_from_their_head(far_y: float, near_y: float, placed: bool) -> None:
    """Track 2 stands at (2.1, far_y) behind track 1 at (2.2, near_y), nearer the camera: the detector's
    box of track 2 ends where track 1's head begins. Taken at face value that bottom edge would put
    track 2 far beyond where they stand; from the top of their head and their height (learnt in the
    first frames, feet in view) they are placed where they are. Not so far off, though, where the
    camera looks too flat for it (10 cm of height would move them more than half a metre): there the
    box is taken as it is."""
    project, an = _steep_camera()
    far = _person_box(project, 2.1, far_y, 1.82)
    for i in range(6):  # alone: feet in view
        an.update(T0 + 0.1 * i, [Track(2, far, 0.9)])
    near = _person_box(project, 2.2, near_y, 1.75)
    cut = (far[0], far[1], far[2], near[1] + 4.0)  # the visible part ends just below track 1's head top
    for i in range(6, 26):
        an.update(T0 + 0.1 * i, [Track(1, near, 0.9), Track(2, cut, 0.9)])
    _, heat = an.flush(T0 + 600)
    cells = np.sum([h["cells"] for h in heat], axis=0).reshape(32, 16)
    assert an.counters["feet_from_head"] == (20 if placed else 0)
    if placed:  # every frame of track 2 after the first, in its cell
        assert cells[int(far_y / 0.25), 8] == pytest.approx(2.5)
    # What the cut box's bottom edge alone says: well over a metre farther off.
    naive = an.homography.to_floor(foot_points([cut]))[0]
    assert naive[1] - far_y > 1.0


def test_one_bad_box_is_not_taken_for_a_persons_height() -> None:
    """Track 2 is first seen in a doorway, its box cut at the knees (the sill): taken as feet, that box
    makes them 0.5 m shorter than they are. Then track 1 steps in front and hides their feet. Placed
    from their head with the height of that one box they would land about a metre off; until a few
    frames agree on a height the configured person_height_m places them, within a cell of the truth."""
    project, an = _steep_camera(person_height_m=1.7)
    for i in range(3):
        an.update(T0 + 0.1 * i, [Track(2, _person_box(project, 2.1, 4.6, 1.7, cut=0.5), 0.9)])
    near = _person_box(project, 2.2, 3.3, 1.75)
    cut = (*_person_box(project, 2.1, 4.6, 1.7)[:3], near[1] + 4.0)
    for i in range(3, 23):
        an.update(T0 + 0.1 * i, [Track(1, near, 0.9), Track(2, cut, 0.9)])
    assert an.counters["feet_from_head"] == 20
    assert an._tracks[2].pos[1] == pytest.approx(4.6, abs=0.1)


def test_level_camera_has_no_vertical_vanishing_point() -> None:
    project = _camera(0.0, 0.0, 3.0, 500.0)
    floor = np.array([[0, 2], [4, 2], [4, 8], [0, 8]], dtype=np.float64)
    h = Homography.from_points(project(np.c_[floor, np.zeros(4)]), floor)
    up = h.uprights((320, 180))
    assert up is None or up.vanishing_point is None


def test_foot_point_of_a_person_leaning_towards_the_vanishing_point() -> None:
    """A downward-looking wide-angle camera images a standing person slanted: the box's bottom-centre is
    off to the side of their feet; following their axis to the box bottom finds the feet."""
    project = _camera(0.0, 35.0, 3.5, 420.0)
    floor = np.array([[0, 2], [4, 2], [4, 8], [0, 8]], dtype=np.float64)
    h = Homography.from_points(project(np.c_[floor, np.zeros(4)]), floor)
    up = h.uprights((320, 180))
    assert up is not None
    vp = up.vanishing_point
    for x, y in ((0.3, 3.0), (3.8, 3.5), (2.0, 6.0)):
        box = [_person_box(project, x, y, 1.8)]
        naive = h.to_floor(foot_points(box))[0]
        followed = h.to_floor(foot_points(box, vp))[0]
        assert np.hypot(followed[0] - x, followed[1] - y) < 0.03
        if abs(x - 2.0) > 1:
            assert abs(naive[0] - x) > 0.1  # what the bottom-centre alone gets wrong
    # No vanishing point (or one above the box): the bottom-centre.
    assert foot_points([[10, 20, 30, 120]], (500.0, 50.0)).tolist() == [[20.0, 120.0]]


def test_points_beyond_the_horizon_are_nan() -> None:
    img = [[100, 400], [500, 400], [450, 100], [150, 100]]
    h = Homography.from_points(img, [[0, 0], [4, 0], [4, 8], [0, 8]])  # horizon at image y = -800
    out = h.to_floor([[300, 300], [300, -800], [300, -2000]])
    assert np.isfinite(out[0]).all() and np.isnan(out[1:]).all()


SQUARE_IMG = [[0, 0], [100, 0], [100, 100], [0, 100]]
SQUARE_FLR = [[0, 0], [1, 0], [1, 1], [0, 1]]


@pytest.mark.parametrize(
    ("img", "flr", "reason"),
    [
        (SQUARE_IMG[:3], SQUARE_FLR[:3], "at least 4"),
        (SQUARE_IMG, SQUARE_FLR[:3] + [[2, 2], [3, 3]], "must pair up"),
        ([[0, 0], [1, 1], [2, 2], [3, 3]], SQUARE_FLR, "image points are collinear"),
        (SQUARE_IMG, [[0, 0], [1, 0], [2, 0], [3, 0]], "floor points are collinear"),
        ([[0, 0], [50, 0], [100, 0], [0, 100]], SQUARE_FLR, "no three may lie on a line"),
        ([[0, 0], [0, 0], [100, 100], [0, 100]], SQUARE_FLR, "coincide"),
        ([[0, 0], [100, 0], [0, 100], [100, 100]], SQUARE_FLR, "same order"),  # two pairs swapped
        ([[0, 0], [100, 0], [100, math.nan], [0, 100]], SQUARE_FLR, "non-finite"),
        ([[5, 5]] * 4, SQUARE_FLR, "same point"),
    ],
)
def test_homography_rejects_degenerate_input(img: list, flr: list, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Homography.from_points(img, flr)


def test_homography_rejects_rank_deficient_overdetermined_pairs() -> None:
    # Five pairs, no four of them giving a unique map: four image points on one line plus one off it.
    img = [[0, 0], [10, 0], [20, 0], [30, 0], [0, 10]]
    with pytest.raises(ValueError, match="degenerate|collinear|horizon"):
        Homography.from_points(img, [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]])


# ---------------------------------------------------------------- point in polygon


def _reference_inside(x: float, y: float, poly: list[tuple[float, float]]) -> bool:
    """Winding number, one point at a time (a different algorithm from the one under test)."""
    wn = 0
    n = len(poly)
    for i in range(n):
        (x1, y1), (x2, y2) = poly[i], poly[(i + 1) % n]
        cross = (x2 - x1) * (y - y1) - (x - x1) * (y2 - y1)
        if y1 <= y < y2 and cross > 0:
            wn += 1
        elif y2 <= y < y1 and cross < 0:
            wn -= 1
    return wn != 0


def _dist_to_boundary(x: float, y: float, poly: list[tuple[float, float]]) -> float:
    best = math.inf
    for i in range(len(poly)):
        (x1, y1), (x2, y2) = poly[i], poly[(i + 1) % len(poly)]
        dx, dy = x2 - x1, y2 - y1
        t = max(0.0, min(1.0, ((x - x1) * dx + (y - y1) * dy) / (dx * dx + dy * dy)))
        best = min(best, math.hypot(x - x1 - t * dx, y - y1 - t * dy))
    return best


@st.composite
def star_polygon(draw: st.DrawFn) -> list[tuple[float, float]]:
    """Star-shaped, usually concave: angles evenly spread with jitter (so no gap reaches pi and none
    vanishes, which keeps the polygon simple without filtering), random radii."""
    n = draw(st.integers(3, 14))
    step = 2 * math.pi / n
    jitter = draw(st.lists(st.floats(-0.2, 0.2), min_size=n, max_size=n))
    angles = [(i + j) * step for i, j in enumerate(jitter)]
    radii = draw(st.lists(st.floats(0.5, 10), min_size=len(angles), max_size=len(angles)))
    cx, cy = draw(st.floats(-50, 50)), draw(st.floats(-50, 50))
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a, r in zip(angles, radii, strict=True)]


@FAST
@given(star_polygon(), st.lists(st.tuples(st.floats(-12, 12), st.floats(-12, 12)), min_size=1, max_size=60))
def test_point_in_polygon_matches_reference_on_concave_polygons(
    poly: list[tuple[float, float]], offsets: list[tuple[float, float]]
) -> None:
    cx = sum(p[0] for p in poly) / len(poly)
    cy = sum(p[1] for p in poly) / len(poly)
    pts = [(cx + dx, cy + dy) for dx, dy in offsets]
    pts = [p for p in pts if _dist_to_boundary(*p, poly) > 1e-7]  # on the boundary either answer is right
    assume(pts)
    check_simple_polygon(poly)  # star-shaped polygons are simple: the config check accepts them
    got = points_in_polygon(pts, poly).tolist()
    assert got == [_reference_inside(x, y, poly) for x, y in pts]


def test_point_in_polygon_concave_u_shape_and_nan() -> None:
    u = Polygon.of([[0, 0], [3, 0], [3, 3], [2, 3], [2, 1], [1, 1], [1, 3], [0, 3]])
    pts = [[0.5, 2], [1.5, 2], [2.5, 2], [1.5, 0.5], [4, 1], [math.nan, 1]]
    assert u.contains(pts).tolist() == [True, False, True, True, False, False]


def test_shared_edge_belongs_to_exactly_one_zone() -> None:
    left, right = Polygon.of([[0, 0], [1, 0], [1, 1], [0, 1]]), Polygon.of([[1, 0], [2, 0], [2, 1], [1, 1]])
    pts = np.array([[1.0, y] for y in np.linspace(0.05, 0.95, 19)])
    assert (left.contains(pts).astype(int) + right.contains(pts).astype(int)).tolist() == [1] * 19


def test_self_intersecting_zone_is_rejected() -> None:
    with pytest.raises(ValueError, match="intersects itself"):
        check_simple_polygon([[0, 0], [1, 1], [1, 0], [0, 1]])
    with pytest.raises(ValidationError, match="intersects itself"):
        config(zones={"bowtie": [[0, 0], [1, 1], [1, 0], [0, 1]]})


# ---------------------------------------------------------------- config


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValidationError, match="extra"):
        config(colour="red")
    with pytest.raises(ValidationError, match="inside point lies on the line"):
        config(lines={"door": {"a": [0, 0], "b": [1, 0], "inside": [5, 0]}})
    with pytest.raises(ValidationError, match="strictly increasing"):
        config(dwell_edges_s=[30, 10])
    with pytest.raises(ValidationError, match="same order"):
        config(homography={"image": [[0, 0], [100, 0], [0, 100], [100, 100]], "floor": SQUARE_FLR})
    with pytest.raises(ValidationError, match="cell_m"):
        config(heatmap={"width_m": 1000, "height_m": 1000, "cell_m": 0.1})


# ---------------------------------------------------------------- dwell


def test_dwell_visit_exact_with_brief_disappearance_and_edge_wobble() -> None:
    an = TrafficAnalytics(config())
    t = T0 + 5
    pts: list[tuple[float, float] | None] = []
    pts += [(1.0, 4.0)] * 5  # outside the zone
    pts += [(3.0, 4.0)] * 20  # inside from frame 5 (t + 5 s at 1 fps)
    pts += [None] * 1  # occluded for 1.5 s < 2 s grace (frames at 1 s; gap 2 s between sightings)
    pts += [(2.0 - 0.05, 4.0)]  # foot point wobbles just outside the edge for one frame (< zone grace)
    pts += [(4.0, 4.0)] * 10  # inside again, last inside at frame 36
    pts += [(9.0, 4.0)] * 5  # clearly out
    frames = [(t + i, [person(7, *p)] if p else []) for i, p in enumerate(pts)]
    run(an, frames)
    stats, _ = an.flush(t + 100)
    visits = an.pop_visits()
    assert [(v.track_id, v.zone, v.enter_ts - t, v.leave_ts - t, v.seconds) for v in visits] == [
        (7, "shelf", 5.0, 36.0, 31.0)
    ]
    shelf = [s for s in stats if s["zone"] == "shelf"]
    assert sum(s["visits"] for s in shelf) == 1
    (hit,) = [s for s in shelf if s["visits"]]
    assert parse_rfc3339(hit["bucket_start"]) <= t + 36 < parse_rfc3339(hit["bucket_start"]) + 60
    assert hit["dwell_median_s"] == 31.0 and hit["dwell_hist"] == [0, 0, 1, 0]  # [30, 60)


def test_track_lost_longer_than_grace_splits_visit_and_short_visits_do_not_count() -> None:
    an = TrafficAnalytics(config())
    t = T0
    frames: list[tuple[float, list[Track]]] = []
    frames += [(t + i, [person(1, 3, 3)]) for i in range(0, 11)]  # inside 0..10
    frames += [(t + 14 + i, [person(1, 3, 3)]) for i in range(0, 4)]  # lost 4 s > grace; back 14..17: 3 s
    frames += [(t + 25 + i, [person(1, 3, 3)]) for i in range(0, 7)]  # back again 25..31: 6 s
    run(an, frames)
    an.flush(t + 120)
    assert [(v.enter_ts - t, v.leave_ts - t, v.seconds) for v in an.pop_visits()] == [(0, 10, 10), (25, 31, 6)]
    assert an.counters["short_visits"] == 1


def test_visit_is_reported_in_the_bucket_of_its_leave_time_even_when_closed_later() -> None:
    an = TrafficAnalytics(config())
    t = T0 + 50
    run(an, [(t + i, [person(1, 3, 3)]) for i in range(10)])  # inside 50..59, leaves view at 59
    # The minute [T0, T0 + 60) ended, but the visit could still continue: the bucket is held back.
    stats, _ = an.flush(T0 + 60)
    assert stats == []
    run(an, [(T0 + 60 + i, []) for i in range(3)])  # empty frames; lost after the 2 s grace
    stats, _ = an.flush(T0 + 62)
    shelf = [s for s in stats if s["zone"] == "shelf"]
    assert len(shelf) == 1 and shelf[0]["bucket_start"] == "2026-01-01T00:00:00.000Z" and shelf[0]["visits"] == 1


def test_zone_grace_zero_ends_the_visit_at_the_first_frame_outside() -> None:
    an = TrafficAnalytics(config(zone_grace_s=0.0))
    pts = [(3.0, 3.0)] * 8 + [(1.0, 3.0)] + [(3.0, 3.0)] * 8  # one frame outside splits the visit
    run(an, [(T0 + i, [person(1, *p)]) for i, p in enumerate(pts)])
    an.flush(T0 + 60)
    assert [(v.enter_ts - T0, v.leave_ts - T0) for v in an.pop_visits()] == [(0, 7), (9, 16)]


def test_flush_refuses_a_nan_watermark() -> None:
    an = TrafficAnalytics(config())
    an.update(T0, [person(1, 3, 3)])
    with pytest.raises(ValueError, match="finite"):
        an.flush(math.nan)


# ---------------------------------------------------------------- lines


def test_slow_walker_in_and_out_through_the_door() -> None:
    an = TrafficAnalytics(config())
    ys = [12 - 0.1 * i for i in range(41)]  # y 12 -> 8: crosses y = 10 going in
    run(an, [(T0 + 0.1 * i, [person(1, 10, y)]) for i, y in enumerate(ys)])
    run(an, [(T0 + 5 + 0.1 * i, [person(1, 10, y)]) for i, y in enumerate(reversed(ys))])
    stats, _ = an.flush(T0 + 60)
    assert line_totals(stats) == (1, 1)
    assert [(c.line, c.direction) for c in an.pop_crossings()] == [("door", "in"), ("door", "out")]


def test_fast_walker_crossing_between_two_frames_is_counted() -> None:
    an = TrafficAnalytics(config())
    # 1 fps and a runner: 11.5 m one frame, 8.5 m the next. No frame ever sees them near the line.
    run(an, [(T0, [person(3, 9, 11.5)]), (T0 + 1, [person(3, 11, 8.5)]), (T0 + 2, [person(3, 11, 6.0)])])
    stats, _ = an.flush(T0 + 60)
    assert line_totals(stats) == (1, 0)


def test_fast_walker_across_a_brief_occlusion_is_counted() -> None:
    an = TrafficAnalytics(config())
    run(an, [(T0, [person(3, 10, 12)]), (T0 + 0.5, []), (T0 + 1.0, []), (T0 + 1.5, [person(3, 10, 8)])])
    assert line_totals(an.flush(T0 + 60)[0]) == (1, 0)


def _hidden_across_the_line(new_id: int, new_x: float = 10.0, occluder: bool = True) -> list[tuple[float, list[Track]]]:
    """Walks in from y 12 to 10.6 and goes behind someone standing at the door (their boxes overlap),
    hidden 1 s, found again at y 9.4 by the tracker under ``new_id``."""
    stander = [person(50, 10.2, 10.6)] if occluder else []
    seen = [(T0 + 0.1 * i, [person(1, 10, 12 - 0.1 * i), *stander]) for i in range(15)]
    hidden = [(T0 + 1.5 + 0.1 * i, list(stander)) for i in range(10)]
    later = [(T0 + 2.5 + 0.1 * i, [person(new_id, new_x, 9.4 - 0.1 * i), *stander]) for i in range(15)]
    return seen + hidden + later


def test_walker_found_again_under_a_new_id_after_crossing_while_hidden_is_counted() -> None:
    an = TrafficAnalytics(config())
    run(an, _hidden_across_the_line(new_id=7))
    assert line_totals(an.flush(T0 + 60)[0]) == (1, 0)
    assert [(c.track_id, c.direction) for c in an.pop_crossings()] == [(7, "in")]
    assert an.counters["reattached"] == 1


def test_reattach_off_or_out_of_reach_loses_the_hidden_crossing() -> None:
    off = TrafficAnalytics(config(reattach_speed_mps=0))
    run(off, _hidden_across_the_line(new_id=7))
    assert line_totals(off.flush(T0 + 60)[0]) == (0, 0)
    # 1.1 s unseen at 2 m/s plus 1 m: 3.2 m of reach; someone new 5 m away is someone else.
    far = TrafficAnalytics(config())
    run(far, _hidden_across_the_line(new_id=7, new_x=15.0))
    assert line_totals(far.flush(T0 + 60)[0]) == (0, 0)
    assert far.counters["reattached"] == 0
    # Nobody to hide behind: who vanished left the view, and who appears there next is someone else.
    alone = TrafficAnalytics(config())
    run(alone, _hidden_across_the_line(new_id=7, occluder=False))
    assert alone.counters["reattached"] == 0


def test_an_id_that_jumps_to_someone_else_leaves_its_person_to_be_found_again() -> None:
    # A walks in (id 1) and is about to cross when, passing B head-on, the tracker moves id 1 onto B
    # 2.9 m away (nobody moves that far in 0.1 s) and picks A up again just inside under id 7.
    an = TrafficAnalytics(config())
    b_out = [person(2, 10.3, 11.5 + 0.1 * i) for i in range(15)]  # B walking out, just beside A
    run(an, [(T0 + 0.1 * i, [person(1, 10, 12 - 0.1 * i), b_out[i]]) for i in range(15)])
    run(an, [(T0 + 1.5 + 0.1 * i, [person(1, 10.3, 13.5 + 0.1 * i), person(7, 10, 9.7 - 0.1 * i)])
             for i in range(15)])
    assert an.counters["identity_jumps"] == 1
    assert an.counters["reattached"] == 1
    assert line_totals(an.flush(T0 + 60)[0]) == (1, 0)
    assert [(c.track_id, c.direction) for c in an.pop_crossings()] == [(7, "in")]


def test_a_runner_keeps_their_id() -> None:
    # 4 m/s is a run, not a jump: the same id crosses and nothing is split off.
    an = TrafficAnalytics(config())
    run(an, [(T0 + 0.1 * i, [person(1, 10, 14 - 0.4 * i)]) for i in range(20)])
    assert an.counters["identity_jumps"] == 0
    an.flush(T0 + 60)
    assert [(c.track_id, c.direction) for c in an.pop_crossings()] == [(1, "in")]


def test_hidden_walker_is_found_where_their_pace_took_them() -> None:
    # At 3 m/s, hidden 1.5 s behind a stander at the door: 4.5 m on, more than the 1 m + 2 m/s x 1.5 s
    # anyone could cover from a standstill, but just where they were heading.
    stander = person(50, 10.2, 10.6)
    seen = [(T0 + 0.1 * i, [person(1, 10, 12.5 - 0.3 * i), stander]) for i in range(6)]  # to y 11.0
    hidden = [(T0 + 0.6 + 0.1 * i, [stander]) for i in range(15)]
    later = [(T0 + 2.1 + 0.1 * i, [person(7, 10, 6.5 - 0.3 * i), stander]) for i in range(5)]
    an = TrafficAnalytics(config())
    run(an, seen + hidden + later)
    an.flush(T0 + 60)
    assert an.counters["reattached"] == 1
    assert [(c.track_id, c.direction) for c in an.pop_crossings()] == [(7, "in")]


def test_reattach_never_takes_a_track_seen_in_the_same_frame() -> None:
    an = TrafficAnalytics(config())
    # Two people side by side; a third appears next to them: both are still seen, so it is new.
    run(an, [(T0 + 0.1 * i, [person(1, 10, 12 - 0.1 * i), person(2, 10.5, 12 - 0.1 * i)]) for i in range(10)])
    run(an, [(T0 + 1.0 + 0.1 * i, [person(1, 10, 11 - 0.1 * i), person(2, 10.5, 11 - 0.1 * i),
                                   person(3, 10.3, 11.2 - 0.1 * i)]) for i in range(40)])
    assert an.counters["reattached"] == 0
    assert line_totals(an.flush(T0 + 60)[0]) == (3, 0)


def test_visit_continues_across_an_id_switch() -> None:
    an = TrafficAnalytics(config())
    # 4 s in the shelf zone as track 1, hidden 1 s behind someone passing outside the zone, then 5 s
    # more as track 9: one visit of 10 s.
    run(an, [(T0 + 0.5 * i, [person(1, 4, 5.5), person(50, 4.2, 6.5)]) for i in range(9)])
    run(an, [(T0 + 4.5, [person(50, 4.2, 6.5)])])
    run(an, [(T0 + 5 + 0.5 * i, [person(9, 4.1, 5.5)]) for i in range(11)])
    an.flush(T0 + 60)
    assert [(v.track_id, v.seconds) for v in an.pop_visits()] == [(9, 10.0)]


def _hidden_behind_someone(hold: float) -> TrafficAnalytics:
    """Track 1 stands at (4.3, 3.8) in the shelf zone; from 3 s track 50 stands just in front of it (nearer
    the camera, its box over two thirds of track 1's); track 1 is not detected from 5 s until 50 walks
    off at 15 s, and is found again at 15.5 s as track 7 where it stood, until 20 s."""
    an = TrafficAnalytics(config(occlusion_hold_s=hold))
    for i in range(41):
        ts = T0 + 0.5 * i
        tracks = []
        if ts < T0 + 5:
            tracks.append(person(1, 4.3, 3.8))
        elif ts >= T0 + 15.5:
            tracks.append(person(7, 4.3, 3.8))
        if T0 + 3 <= ts <= T0 + 15:
            tracks.append(person(50, 4.3, 4.4))
        an.update(ts, tracks)
    return an


def test_a_person_standing_hidden_behind_another_stays_in_the_visit_and_on_the_heatmap() -> None:
    an = _hidden_behind_someone(hold=30.0)
    _, heat = an.flush(T0 + 100)
    assert sorted((v.track_id, v.seconds) for v in an.pop_visits()) == [(7, 20.0), (50, 12.0)]
    cells = np.sum([h["cells"] for h in heat], axis=0)
    assert cells[3 * 20 + 4] == pytest.approx(20.0)  # track 1's cell, the whole 20 s
    assert an.counters["held_hidden"] == 21  # the frames at 5, 5.5, .. 15 s
    # Without the hold the visit is cut in two, 4.5 s each side of the occlusion: too short to count.
    an = _hidden_behind_someone(hold=0.0)
    an.flush(T0 + 100)
    assert [(v.track_id, v.seconds) for v in an.pop_visits()] == [(50, 12.0)]
    assert an.counters["short_visits"] == 2


def test_a_walker_going_behind_someone_is_not_held() -> None:
    an = TrafficAnalytics(config())
    # Track 2 walks 1.5 m/s across behind track 50 (standing at (10, 9)) and is lost there: it may have
    # walked on out of view, so it is kept only for the grace, not held.
    frames = [(T0 + 0.1 * i, [person(50, 10.0, 9.0)] + ([person(2, 8.0 + 0.15 * i, 8.6)] if i <= 14 else []))
              for i in range(60)]
    run(an, frames)
    assert an.counters["held_hidden"] == 0


def test_a_crossing_undone_within_the_confirmation_time_counts_nothing() -> None:
    an = TrafficAnalytics(config())
    # Someone standing in the doorway (y = 10.1, outside) whose foot point jumps 0.6 m inside for two
    # frames (their box cut by a person in front): nothing. Then they walk in and stay: one entry. Then
    # out and, 3 s later, back in: an exit and an entry.
    ys = [10.1] * 4 + [9.5] * 2 + [10.1] * 4 + [10.4, 10.0, 9.5, 9.0] + [9.0] * 10 + [10.5] * 6 + [9.0] * 10
    run(an, frames_from(walk(1, [(10.0, y) for y in ys], T0, 0.5)))
    entries, exits = line_totals(an.flush(T0 + 600)[0])
    assert [c.direction for c in an.pop_crossings()] == ["in", "out", "in"]
    assert (entries, exits) == (2, 1) and an.counters["crossings_undone"] == 1


def test_jittering_walker_on_the_line_counts_once() -> None:
    an = TrafficAnalytics(config())
    rng = random.Random(3)
    ys = [11.0, 10.5]
    ys += [10 + rng.uniform(-0.18, 0.18) for _ in range(200)]  # dithering on the line, inside the 0.2 m band
    ys += [9.5, 9.0, 8.0]
    run(an, [(T0 + 0.1 * i, [person(1, 10, y)]) for i, y in enumerate(ys)])
    assert line_totals(an.flush(T0 + 60)[0]) == (1, 0)


def test_crossing_beside_the_doorway_does_not_count() -> None:
    an = TrafficAnalytics(config())  # the door spans x 8..12 at y = 10
    run(an, [(T0 + 0.1 * i, [person(1, 14, 12 - 0.1 * i)]) for i in range(41)])  # x = 14: past the end
    # Diagonals that meet y = 10 at x = 7.9 (beside the door) and at x = 8.1 (just inside it).
    run(an, [(T0 + 5 + 0.1 * i, [person(2, 11.9 - 0.2 * i, 12 - 0.1 * i)]) for i in range(41)])
    run(an, [(T0 + 10 + 0.1 * i, [person(3, 12.1 - 0.2 * i, 12 - 0.1 * i)]) for i in range(41)])
    assert line_totals(an.flush(T0 + 60)[0]) == (1, 0)
    assert [c.track_id for c in an.pop_crossings()] == [3]


def _reference_crossings(ds: list[float], band: float) -> list[int]:
    """Signs of the foot point's side, keeping only clear ones (the first point always counts),
    with repeats collapsed; every change is one crossing (+1 in, -1 out)."""
    clear = ([1 if ds[0] > 0 else -1] if ds[0] != 0 else []) + [
        1 if d > 0 else -1 for d in ds[1:] if d != 0 and abs(d) >= band
    ]
    out = []
    for a, b in zip(clear, clear[1:], strict=False):
        if a != b:
            out.append(b)
    return out


@FAST
@given(
    st.lists(
        st.lists(st.floats(-1.0, 1.0), min_size=2, max_size=60),  # per-frame y steps of one person
        min_size=1,
        max_size=5,
    ),
    st.floats(8.5, 11.5),
    st.sampled_from([0.0, 0.05, 0.2, 0.5]),
)
def test_random_walks_never_double_count(walks: list[list[float]], y0: float, band: float) -> None:
    # A door as wide as the floor, so every crossing of y = 10 is through it.
    cfg = config(lines={"door": {"a": [-100, 10], "b": [100, 10], "inside": [0, 0]}}, line_hysteresis_m=band,
                 line_confirm_s=0)
    an = TrafficAnalytics(cfg)
    paths = []
    for steps in walks:
        ys = [y0]
        for s in steps:
            ys.append(ys[-1] + s)
        paths.append(ys)
    n = max(len(p) for p in paths)
    for i in range(n):
        an.update(T0 + 0.5 * i, [person(tid, 10 + tid * 0.3, p[i]) for tid, p in enumerate(paths) if i < len(p)])
    entries, exits = line_totals(an.flush(T0 + 600)[0])
    by_track: dict[int, list[str]] = {}
    for c in an.pop_crossings():
        by_track.setdefault(c.track_id, []).append(c.direction)
    exp_in = exp_out = 0
    for tid, ys in enumerate(paths):
        # Signed distance, positive inside (y < 10), of the floor points the engine sees: a foot
        # point exactly on the line may come back from the homography a hair to either side.
        feet = np.array([[(10 + tid * 0.3) * PX_PER_M, y * PX_PER_M] for y in ys])
        ds = (10 - an.homography.to_floor(feet)[:, 1]).tolist()
        ref = _reference_crossings(ds, band)
        exp_in += ref.count(1)
        exp_out += ref.count(-1)
        got = by_track.get(tid, [])
        assert got == ["in" if r == 1 else "out" for r in ref]
        # Crossings of one track alternate: a second "in" without an "out" between would be a double count.
        assert all(a != b for a, b in zip(got, got[1:], strict=False))
        # Never more than the times the path actually changed sides.
        sides = [d >= 0 for d in ds]
        assert len(got) <= sum(a != b for a, b in zip(sides, sides[1:], strict=False))
    assert (entries, exits) == (exp_in, exp_out)


# ---------------------------------------------------------------- occupancy and heatmap


def test_occupancy_min_avg_max_is_time_weighted() -> None:
    an = TrafficAnalytics(config())
    frames: list[tuple[float, list[Track]]] = [(T0, [])]
    # 0..20 s: two in the zone at 1 fps; 20..60 s: one, at 0.5 fps. A per-frame mean would say
    # (20 * 2 + 20 * 1) / 40 = 1.5; the time-weighted mean is (20 * 2 + 40 * 1) / 60 = 1.333.
    frames += [(T0 + i, [person(1, 3, 3), person(2, 4, 4)]) for i in range(1, 21)]
    frames += [(T0 + 20 + 2 * i, [person(1, 3, 3), person(9, 15, 15)]) for i in range(1, 20)]
    frames += [(T0 + 60, [])]
    run(an, frames)
    assert an.flush(T0 + 60) == ([], [])  # person 1 was inside at T0 + 58 and may still come back
    stats, _ = an.flush(T0 + 120)
    shelf = next(s for s in stats if s["zone"] == "shelf")
    cam = next(s for s in stats if s["zone"] is None)
    # Frames with a gap longer than max_frame_gap_s (1 s) are credited 1 s each.
    assert (shelf["occupancy_min"], shelf["occupancy_max"]) == (0.0, 2.0)
    assert shelf["occupancy_avg"] == pytest.approx((20 * 2 + 19 * 1) / 39, abs=1e-4)
    assert (cam["occupancy_min"], cam["occupancy_max"]) == (0.0, 2.0)


def test_occupancy_time_weighting_with_default_cap() -> None:
    an = TrafficAnalytics(config(max_frame_gap_s=5.0))
    frames = [(T0 + i, [person(1, 3, 3), person(2, 4, 4)]) for i in range(0, 21)]
    frames += [(T0 + 20 + 2 * i, [person(1, 3, 3)]) for i in range(1, 20)]
    run(an, frames)
    shelf = next(s for s in an.flush(T0 + 120)[0] if s["zone"] == "shelf")
    assert shelf["occupancy_avg"] == pytest.approx((20 * 2 + 38 * 1) / 58, abs=1e-4)
    assert (shelf["occupancy_min"], shelf["occupancy_max"]) == (1.0, 2.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_heatmap_person_seconds_equal_visible_and_hidden_time(seed: int) -> None:
    """Every frame credits each person in it; a track that comes back within the grace is also credited
    the frames it was missing from (the person was hidden, not gone), never more than 1 s a frame."""
    rng = random.Random(seed)
    an = TrafficAnalytics(config(reattach_speed_mps=0, occlusion_hold_s=0))
    grace = an.config.track_grace_s
    ts = T0 + rng.uniform(0, 30)
    expected = 0.0
    prev = None
    # Kept inside the 20 x 20 m grid (a point exactly on its edge may round to either side).
    people = {tid: (rng.uniform(0.01, 19.99), rng.uniform(0.01, 19.99)) for tid in range(rng.randint(1, 8))}
    seen: dict[int, tuple[float, int]] = {}  # track -> (time, frame number) of its last sighting
    for frame in range(rng.randint(2, 150)):
        ts += rng.choice([0.04, 0.1, 0.5, 1.0, 3.0])  # 3 s gaps are credited at most 1 s
        visible = [tid for tid in people if rng.random() < 0.7]
        for tid in visible:
            x, y = people[tid]
            people[tid] = (min(19.99, max(0.01, x + rng.uniform(-0.5, 0.5))), min(19.99, max(0.01, y + rng.uniform(-0.5, 0.5))))
        an.update(ts, [person(tid, *people[tid]) for tid in visible])
        if prev is not None:
            expected += min(ts - prev, 1.0) * len(visible)
            for tid in visible:
                last = seen.get(tid)
                if last is not None and ts - last[0] <= grace and frame - last[1] > 1:
                    expected += min(prev - last[0], (frame - last[1] - 1) * 1.0)
        seen.update({tid: (ts, frame) for tid in visible})
        prev = ts
    _, heat = an.flush(ts + 1000)
    got = sum(sum(h["cells"]) for h in heat)
    assert got == pytest.approx(expected, abs=1e-3 * (1 + len(heat) * 400))


def test_heatmap_paints_the_right_cell() -> None:
    an = TrafficAnalytics(config(heatmap={"origin": [0, 0], "width_m": 4, "height_m": 3, "cell_m": 1.0}))
    run(an, [(T0 + 0.5 * i, [person(1, 2.5, 1.2), person(2, 9, 9)]) for i in range(5)])  # person 2 off grid
    _, (h,) = an.flush(T0 + 60)
    assert (h["cols"], h["rows"]) == (4, 3)
    cells = np.array(h["cells"]).reshape(3, 4)
    assert cells[1, 2] == pytest.approx(2.0) and cells.sum() == pytest.approx(2.0)
    assert an.counters["heat_off_grid"] == 4


def test_a_heatmap_carries_its_origin_and_doors_in_floor_metres() -> None:
    """HQ draws the grid to scale with the doors on it from the message alone (no image, no camera config)."""
    an = TrafficAnalytics(config(heatmap={"origin": [1, 2], "width_m": 4, "height_m": 3, "cell_m": 1.0}))
    run(an, [(T0 + 0.5 * i, [person(1, 2.5, 3.2)]) for i in range(3)])
    _, (h,) = an.flush(T0 + 60)
    assert h["origin"] == [1, 2]
    assert h["doors"] == [{"name": n, "a": list(ln.a), "b": list(ln.b)} for n, ln in an.config.lines.items()]
    assert h["doors"]  # the test config has a counting line
    TrafficHeatmapItem.model_validate(h)  # the contract accepts it as the agent sends it


# ---------------------------------------------------------------- filters


def test_masks_min_height_conf_and_bad_boxes_are_ignored() -> None:
    cfg = config(
        ignore_masks=[[[250, 250], [450, 250], [450, 450], [250, 450]]],  # image pixels: floor 2.5..4.5 m
        min_box_height_px=100,
        min_conf=0.3,
    )
    an = TrafficAnalytics(cfg)
    tracks = [
        person(1, 3, 3),  # foot point in the mask (a mannequin)
        Track(2, (280.0, 500.0, 320.0, 550.0), 0.9),  # 50 px tall: too small
        person(3, 5, 5, conf=0.1),
        Track(4, (1.0, 2.0, 0.5, 3.0), 0.9),  # x2 < x1
        Track(5, (math.nan, 0.0, 1.0, 1.0), 0.9),
        person(6, 5.5, 5.5),  # the only real person, inside the zone
        person(6, 15, 15, conf=0.5),  # same id twice in one frame: the more confident one wins
    ]
    run(an, [(T0 + i, tracks) for i in range(10)])
    stats, _ = an.flush(T0 + 60)
    shelf = next(s for s in stats if s["zone"] == "shelf")
    cam = next(s for s in stats if s["zone"] is None)
    assert shelf["occupancy_max"] == 1.0 and cam["occupancy_max"] == 1.0
    c = an.counters
    assert (c["dropped_masked"], c["dropped_small"], c["dropped_conf"], c["dropped_invalid"], c["dropped_duplicate"]) == (
        10, 10, 10, 20, 10)


# ---------------------------------------------------------------- buckets, determinism, contract


def _scene(seed: int, seconds: float = 300.0) -> list[tuple[float, list[Track]]]:
    rng = random.Random(seed)
    frames = []
    people: dict[int, list[float]] = {}
    next_id = 1
    t = T0 + 7.3
    while t < T0 + seconds:
        if rng.random() < 0.05 or not people:
            people[next_id] = [rng.uniform(0, 20), rng.uniform(0, 20), rng.uniform(-1, 1), rng.uniform(-1, 1)]
            next_id += 1
        dt = rng.choice([0.1, 0.2, 0.5])
        for tid in list(people):
            p = people[tid]
            p[2] += rng.uniform(-0.3, 0.3)
            p[3] += rng.uniform(-0.3, 0.3)
            p[0] += p[2] * dt
            p[1] += p[3] * dt
            if not (0 <= p[0] < 20 and 0 <= p[1] < 20) or rng.random() < 0.002:
                del people[tid]
        t += dt
        frames.append((t, [person(tid, p[0], p[1]) for tid, p in people.items() if rng.random() < 0.9]))
    return frames


def test_bucket_boundaries_and_alignment() -> None:
    an = TrafficAnalytics(config(bucket_s=60))
    frames = _scene(1, 300)
    run(an, frames)
    assert an.flush(T0 + 59.9) == ([], [])  # nothing has ended yet
    stats, heat = an.flush(T0 + 1000)
    starts = sorted({parse_rfc3339(s["bucket_start"]) for s in stats})
    last = frames[-1][0]
    assert starts == [T0 + 60 * k for k in range(int((last - T0) // 60) + 1)]
    assert [parse_rfc3339(h["bucket_start"]) for h in heat] == starts
    assert all(s["bucket_s"] == 60 for s in stats)
    assert len(stats) == len(starts) * 2  # camera-wide plus one per zone
    assert an.flush(T0 + 2000) == ([], [])  # flushed buckets are gone
    an.update(T0 + 500, [person(1, 3, 3)])  # older than the watermark: dropped, counted
    assert an.counters["late_frames"] == 1


def test_frames_at_bucket_edges_go_to_the_later_bucket() -> None:
    an = TrafficAnalytics(config())
    run(an, [(T0 + 59.999, [person(1, 15, 15)]), (T0 + 60.0, [person(1, 15, 15), person(2, 16, 16)])])
    stats, _ = an.flush(T0 + 120)
    cam = [s for s in stats if s["zone"] is None]
    assert [(s["bucket_start"], s["occupancy_max"]) for s in cam] == [
        ("2026-01-01T00:00:00.000Z", 1.0),
        ("2026-01-01T00:01:00.000Z", 2.0),
    ]


def test_deterministic_regardless_of_flush_cadence_and_track_order() -> None:
    frames = _scene(5, 400)
    a = TrafficAnalytics(config())
    run(a, frames)
    out_a = a.flush(T0 + 1000)

    b = TrafficAnalytics(config())
    rng = random.Random(9)
    stats_b: list[dict[str, Any]] = []
    heat_b: list[dict[str, Any]] = []
    for ts, tracks in frames:
        shuffled = list(tracks)
        rng.shuffle(shuffled)
        b.update(ts, shuffled)
        s, h = b.flush(ts)  # flush at every frame, with the frame time as the watermark
        stats_b += s
        heat_b += h
    s, h = b.flush(T0 + 1000)
    assert out_a == (stats_b + s, heat_b + h)
    assert out_a[0]  # and the scene produced something
    assert a.counters == b.counters


def test_items_validate_against_the_contract_and_compact() -> None:
    an = TrafficAnalytics(config(zones={
        "shelf": [[2, 2], [6, 2], [6, 6], [2, 6]],
        "L": [[8, 0], [20, 0], [20, 4], [12, 4], [12, 8], [8, 8]],
    }))
    run(an, _scene(2, 600))
    stats, heat = an.flush(T0 + 2000)
    assert stats and heat
    for s in stats:
        m = TrafficStatsItem.model_validate(s)
        assert m.camera == "cam1"
        if m.zone is not None:
            assert len(m.dwell_hist) == len(m.dwell_edges_s) + 1 and sum(m.dwell_hist) == m.visits
        assert m.occupancy_min <= m.occupancy_avg <= m.occupancy_max
    for h in heat:
        m2 = TrafficHeatmapItem.model_validate(h)
        assert len(m2.cells) == m2.cols * m2.rows == 400
    assert sum(s["visits"] for s in stats) > 0 and sum(s["entries"] + s["exits"] for s in stats) > 0
    # The outbox's coarsening under disk pressure must be able to merge what we emit.
    shelf = [s for s in stats if s["zone"] == "shelf"]
    TrafficStatsItem.model_validate(merge_stats(shelf, 900))
    TrafficHeatmapItem.model_validate(merge_heatmap(heat, 900))
