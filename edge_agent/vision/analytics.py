"""Per-camera traffic analytics: tracked people -> zone occupancy, dwell visits, line crossings, heatmap.

Pure and clocked by the frames: time comes only from the timestamps passed to ``update`` and
``flush``, never from a clock, so replaying a recorded track feed gives identical items. No image
data enters here, only boxes in pixels; everything that leaves is counts and seconds.

Lifecycle: ``update(ts, tracks)`` for every processed frame (timestamps never go backwards), and
``flush(until_ts)`` from time to time to take the finished time buckets as contract items.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from numpy.typing import NDArray
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from ..clock import rfc3339
from ..contract import Name
from .floor import (
    FloatArray,
    Homography,
    Polygon,
    Uprights,
    box_areas,
    box_intersections,
    check_simple_polygon,
    feet_hidden,
    foot_points,
    head_points,
)


def _finite(v: tuple[float, float]) -> tuple[float, float]:
    if not (math.isfinite(v[0]) and math.isfinite(v[1])):
        raise ValueError("coordinates must be finite")
    return v


Point = Annotated[tuple[float, float], AfterValidator(_finite)]
PolygonPoints = Annotated[list[Point], Field(min_length=3, max_length=256)]

# Bin boundaries of the dwell histogram (len(edges) + 1 bins); browsing, considering, long stays.
DEFAULT_DWELL_EDGES_S = [10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
MAX_HEATMAP_CELLS = 65_536  # one item per bucket must fit comfortably in an outbox message
LOG_KEEP = 10_000  # visits/crossings kept for pop_*() if nobody drains them


# ---------------------------------------------------------------- config


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HomographyConfig(_Model):
    """Four or more pairs: ``image[i]`` (pixels) is where floor point ``floor[i]`` (metres) appears."""

    image: list[Point] = Field(min_length=4)
    floor: list[Point] = Field(min_length=4)
    # The camera's frame size (width, height) the image points are in. Optional; with it the analytics
    # knows how the camera sees upright people (floor.Uprights): a foot point follows a person's lean
    # towards the vertical vanishing point, and a person whose feet are hidden is placed from their head.
    image_size: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _solvable(self) -> HomographyConfig:
        self.build()  # raises ValueError with the reason, which pydantic reports at the config key
        return self

    def build(self) -> Homography:
        return Homography.from_points(self.image, self.floor)

    def uprights(self) -> Uprights | None:
        if self.image_size is None:
            return None
        return self.build().uprights((self.image_size[0] / 2, self.image_size[1] / 2))


class LineConfig(_Model):
    """A counting line on the floor from ``a`` to ``b`` (a doorway: crossings outside it do not count);
    ``inside`` is any floor point on the side a person is in after an entry.

    A point rather than "left"/"right" because left and right flip with the floor plan's axis
    convention (y up or y down), and a point on the shop side is hard to get wrong.
    """

    a: Point
    b: Point
    inside: Point

    @model_validator(mode="after")
    def _geometry(self) -> LineConfig:
        (ax, ay), (bx, by), (px, py) = self.a, self.b, self.inside
        length = math.hypot(bx - ax, by - ay)
        if length < 1e-6:
            raise ValueError("line end points a and b coincide")
        if abs((bx - ax) * (py - ay) - (by - ay) * (px - ax)) / length < 1e-6:
            raise ValueError("the inside point lies on the line: it must be on the 'in' side")
        return self


class HeatmapConfig(_Model):
    """A floor grid: ``origin`` is the corner of cell (row 0, col 0); rows follow +y, columns +x."""

    origin: Point = (0.0, 0.0)
    width_m: float = Field(gt=0)
    height_m: float = Field(gt=0)
    cell_m: float = Field(0.5, gt=0)

    @property
    def cols(self) -> int:
        return max(1, math.ceil(self.width_m / self.cell_m - 1e-9))

    @property
    def rows(self) -> int:
        return max(1, math.ceil(self.height_m / self.cell_m - 1e-9))

    @model_validator(mode="after")
    def _size(self) -> HeatmapConfig:
        if self.cols * self.rows > MAX_HEATMAP_CELLS:
            raise ValueError(f"{self.cols}x{self.rows} cells is more than {MAX_HEATMAP_CELLS}: use a larger cell_m")
        return self


class TrafficAnalyticsConfig(_Model):
    camera: Name
    homography: HomographyConfig
    zones: dict[Name, PolygonPoints] = Field(default_factory=dict)  # floor metres
    lines: dict[Name, LineConfig] = Field(default_factory=dict)  # floor metres
    # Image pixels (shop windows, mannequins, screens): a box whose foot point is inside is not a person here.
    ignore_masks: list[PolygonPoints] = Field(default_factory=list)
    min_box_height_px: float = Field(0.0, ge=0)
    min_conf: float = Field(0.0, ge=0, le=1)
    min_dwell_s: float = Field(5.0, ge=0)
    # A track unseen for longer than this has left: its visits close at their last inside time.
    track_grace_s: float = Field(2.0, gt=0)
    # A person seen outside a zone for this long has left it; shorter excursions (a foot point
    # wobbling over the zone's edge) continue the visit. 0 ends a visit at the first frame outside.
    zone_grace_s: float = Field(1.0, ge=0)
    # A crossing counts once the foot point is this far past the line, so jitter on it counts nothing.
    # 0.3 m: when a person in the doorway is partly hidden their box, and so their foot point, jumps
    # by 0.2-0.3 m; at 0.15 m those jumps counted in-out pairs (synthetic scenes: 6 wrong of 36 doors
    # on three seeds against 4). Anyone walking through a door goes well past 0.3 m.
    line_hysteresis_m: float = Field(0.3, ge=0)
    # A crossing is counted once the track has not crossed back for this long (or has gone), so a foot
    # point jumping to and fro across the line counts nothing; counts and buckets wait that much longer.
    line_confirm_s: float = Field(1.0, ge=0)
    # Height assumed for a person whose feet are hidden before their own height is known (needs
    # homography.image_size; see TrafficAnalytics._place_hidden_feet).
    person_height_m: float = Field(1.7, ge=1.0, le=2.3)
    # A new track that starts where a track lost within track_grace_s could have got to (on at its pace,
    # give or take this speed, plus reattach_radius_m for the foot point's error, which reaches 0.8 m at
    # the far end of a simulated 6 m floor) continues that track, if the lost one was last seen partly
    # covered by another person's box: the tracker lost someone behind another person and found them
    # again under a new id, and a door crossing or a zone visit made while hidden must not be lost with
    # the old id. Someone who vanishes uncovered left the view; who appears there next is someone else.
    # 0 disables it, and with it the split of a track whose id jumps to someone else (JUMP_SPEED_MPS).
    reattach_speed_mps: float = Field(2.0, ge=0)
    reattach_radius_m: float = Field(1.0, ge=0)
    # A lost track whose last box is still mostly behind a nearer person's box (standing in line at a
    # checkout, or behind someone at a shelf) is presumed to be there, hidden, for up to this long since
    # it was last seen: it stays on the heatmap and in occupancy, its zone visits go on, and it is kept
    # for reattachment. 0 disables it (a lost track then lasts track_grace_s).
    occlusion_hold_s: float = Field(30.0, ge=0)
    # Time credited to one frame (heatmap, time-weighted occupancy) is capped at this, so a stalled
    # stream does not paint whoever was last seen for the whole outage.
    max_frame_gap_s: float = Field(1.0, gt=0)
    heatmap: HeatmapConfig | None = None
    bucket_s: int = Field(60, gt=0)
    dwell_edges_s: list[float] = Field(default_factory=lambda: list(DEFAULT_DWELL_EDGES_S), max_length=64)

    @model_validator(mode="after")
    def _check(self) -> TrafficAnalyticsConfig:
        for name, poly in self.zones.items():
            check_simple_polygon(poly, f"zone {name!r}")
        for i, poly in enumerate(self.ignore_masks):
            check_simple_polygon(poly, f"ignore mask {i}")
        e = self.dwell_edges_s
        if any(not math.isfinite(x) or x <= 0 for x in e) or any(b <= a for a, b in zip(e, e[1:], strict=False)):
            raise ValueError("dwell_edges_s must be positive, finite and strictly increasing")
        return self


# ---------------------------------------------------------------- inputs and records


@dataclass(frozen=True, slots=True)
class Track:
    """One tracked person in one frame: box x1, y1, x2, y2 in image pixels."""

    track_id: int
    box: tuple[float, float, float, float]
    conf: float = 1.0


@dataclass(frozen=True, slots=True)
class Visit:
    track_id: int
    zone: str
    enter_ts: float
    leave_ts: float
    seconds: float


@dataclass(frozen=True, slots=True)
class Crossing:
    ts: float
    track_id: int
    line: str
    direction: Literal["in", "out"]


# ---------------------------------------------------------------- state


class _OpenVisit:
    __slots__ = ("enter", "last_inside", "out_since")

    def __init__(self, ts: float) -> None:
        self.enter = ts
        self.last_inside = ts
        self.out_since: float | None = None  # first sighting outside since last_inside


class _TrackState:
    __slots__ = ("last_seen", "seen_frame", "painted_ts", "hidden_ts", "box", "pos", "d", "side", "cross_ok",
                 "pending", "visits", "covered", "trail", "heights")

    def __init__(self, ts: float, pos: FloatArray, d: list[float], frame: int, box: FloatArray) -> None:
        self.last_seen = ts
        self.seen_frame = frame  # the last frame that painted this track on the heatmap
        self.painted_ts = ts
        self.hidden_ts = -math.inf  # the last frame this track was held as hidden behind someone
        self.box = box  # at the last sighting, image pixels
        # Whether another person's box covered part of this one at the last sighting: the evidence that a
        # track lost now went behind someone (and may come back under a new id) rather than out of view.
        self.covered = False
        self.pos = pos
        self.d = d
        # Committed side of each line (+1 in, -1 out, 0 unknown). A track first seen near a line
        # takes the side of its first foot point, so someone picked up in the doorway still counts.
        self.side = [(x > 0) - (x < 0) for x in d]
        # Whether the latest sign change of d happened inside the line's segment (the doorway).
        self.cross_ok = [False] * len(d)
        # Per line, a crossing not counted yet: it is undone if the track crosses back within line_confirm_s.
        self.pending: list[Crossing | None] = [None] * len(d)
        self.visits: dict[int, _OpenVisit] = {}
        self.trail: deque[tuple[float, FloatArray]] = deque([(ts, pos)], maxlen=TRAIL_LEN)
        # Metres, estimated in the frames the feet were in view (image_size given); see height.
        self.heights: deque[float] = deque(maxlen=HEIGHTS_KEPT)

    def velocity(self) -> FloatArray:
        """Floor velocity over the last second or so of sightings (m/s); single frames jitter too much."""
        t0, p0 = self.trail[0]
        t1, p1 = self.trail[-1]
        return (p1 - p0) / (t1 - t0) if t1 > t0 else np.zeros(2)

    def speed(self) -> float:
        return float(np.hypot(*self.velocity()))

    def height(self, default: float) -> float:
        """The person's height: the median of their estimates once there are HEIGHTS_TRUSTED of them. A
        single box can be far off (a person half through a doorway, a detection cut at the knees), and
        one such frame taken as their height misplaced them by a metre for as long as they were hidden."""
        return statistics.median(self.heights) if len(self.heights) >= HEIGHTS_TRUSTED else default


class _Bucket:
    __slots__ = ("start", "frames", "weight", "occ_wsum", "occ_sum", "occ_min", "occ_max",
                 "entries", "exits", "dwells", "heat")

    def __init__(self, start: int, n_occ: int, n_zones: int, n_cells: int) -> None:
        self.start = start
        self.frames = 0
        self.weight = 0.0
        self.occ_wsum = np.zeros(n_occ)
        self.occ_sum = np.zeros(n_occ)
        self.occ_min = np.full(n_occ, np.inf)
        self.occ_max = np.zeros(n_occ)
        self.entries = 0
        self.exits = 0
        self.dwells: list[list[float]] = [[] for _ in range(n_zones)]
        self.heat = np.zeros(n_cells)


HEAD_PLACEMENT_M_PER_DM = 0.5  # floor metres per 10 cm of height error beyond which heads place nobody
HEIGHTS_KEPT = 31  # a person's latest height estimates, about three seconds of frames
HEIGHTS_TRUSTED = 5  # estimates it takes to trust their median over person_height_m
HEIGHT_RANGE_M = (1.0, 2.3)  # a height estimate outside it is a bad box (bent over, cut), not a person
HIDDEN_SHARE = 0.5  # of a lost track's last box inside a nearer person's box: still behind them
HOLD_MAX_SPEED_MPS = 0.4  # faster at the last sighting: walking on, not standing behind someone
JUMP_SPEED_MPS = 5.0  # faster than anyone runs in a shop: a track that moved so far is someone else
TRAIL_LEN = 12  # sightings kept for a track's speed: about a second at 10 analysed frames/s

COUNTERS = (
    "frames", "late_frames", "tracks", "dropped_invalid", "dropped_duplicate", "dropped_conf",
    "dropped_small", "dropped_masked", "dropped_horizon", "visits", "short_visits", "entries", "exits",
    "heat_off_grid", "heat_filled_frames", "held_hidden", "reattached", "crossings_undone", "feet_from_head",
    "identity_jumps",
)


# ---------------------------------------------------------------- engine


class TrafficAnalytics:
    """Traffic analytics of one camera. Not thread-safe: one instance per camera worker."""

    def __init__(self, config: TrafficAnalyticsConfig) -> None:
        self.config = config
        self.homography = config.homography.build()
        self._uprights = config.homography.uprights()
        self._vanishing_point = None if self._uprights is None else self._uprights.vanishing_point
        self._zone_names = list(config.zones)
        self._zones = [Polygon.of(p) for p in config.zones.values()]
        self._masks = [Polygon.of(p) for p in config.ignore_masks]
        self._line_names = list(config.lines)
        a = np.array([ln.a for ln in config.lines.values()], dtype=np.float64).reshape(-1, 2)
        b = np.array([ln.b for ln in config.lines.values()], dtype=np.float64).reshape(-1, 2)
        inside = np.array([ln.inside for ln in config.lines.values()], dtype=np.float64).reshape(-1, 2)
        u = b - a
        length = np.hypot(u[:, 0], u[:, 1])
        normal = np.stack([-u[:, 1], u[:, 0]], axis=1) / length[:, None] if len(a) else np.zeros((0, 2))
        # Orient each normal towards the configured inside so that d > 0 means "in".
        flip = np.sign(((inside - a) * normal).sum(axis=1))
        self._line_a = a
        self._line_dir = u / (length**2)[:, None] if len(a) else np.zeros((0, 2))  # (q - a) . dir in [0, 1] on the segment
        self._line_n = normal * flip[:, None]
        self._line_c = (self._line_a * self._line_n).sum(axis=1)
        self._band = config.line_hysteresis_m
        hm = config.heatmap
        self._heat_cols = hm.cols if hm else 0
        self._heat_rows = hm.rows if hm else 0
        self._edges = np.asarray(config.dwell_edges_s, dtype=np.float64)

        self._tracks: dict[int, _TrackState] = {}
        self._orphans = 0  # the last negative id given to the state of a person a tracker id jumped away from
        self._buckets: dict[int, _Bucket] = {}
        self._last_ts: float | None = None
        self._watermark = -math.inf  # frames before this are late: their buckets may be gone
        self._visit_log: deque[Visit] = deque(maxlen=LOG_KEEP)
        self._crossing_log: deque[Crossing] = deque(maxlen=LOG_KEEP)
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)

    # ------------------------------------------------------------ input

    def update(self, ts: float, tracks: Sequence[Track]) -> None:
        """Account one frame taken at ``ts`` (epoch seconds) with the people tracked in it.

        A frame older than the previous one, or older than the last flush watermark, is dropped
        and counted (``late_frames``): its time bucket may already have been shipped.
        """
        c = self.counters
        if not math.isfinite(ts) or ts < self._watermark or (self._last_ts is not None and ts < self._last_ts):
            c["late_frames"] += 1
            return
        c["frames"] += 1
        dt = 0.0 if self._last_ts is None else min(ts - self._last_ts, self.config.max_frame_gap_s)
        frame = c["frames"]
        self._last_ts = ts
        self._expire(ts)

        ids, feet, floor, boxes = self._accept(tracks)
        n = len(ids)
        if self._uprights is not None and n:
            self._place_hidden_feet(ids, feet, floor, boxes)
        covered = _covered(boxes).tolist()
        c["tracks"] += n
        hidden = self._hidden(ids, boxes, ts)
        if hidden:
            # Counted as present where they were last seen (occupancy, zones, heatmap).
            ids = ids + [tid for tid, _ in hidden]
            floor = np.concatenate([floor, np.array([st.pos for _, st in hidden])])
            n_seen, n = n, n + len(hidden)
        else:
            n_seen = n

        bucket = self._bucket(ts)
        bucket.frames += 1
        bucket.weight += dt
        inside = (
            np.stack([z.contains(floor) for z in self._zones], axis=1)
            if self._zones and n
            else np.zeros((n, len(self._zones)), dtype=bool)
        )
        occ = np.empty(len(self._zones) + 1)
        occ[0] = n
        occ[1:] = inside.sum(axis=0)
        bucket.occ_wsum += occ * dt
        bucket.occ_sum += occ
        np.minimum(bucket.occ_min, occ, out=bucket.occ_min)
        np.maximum(bucket.occ_max, occ, out=bucket.occ_max)
        if self._heat_cols and n and dt > 0:
            self._paint(bucket, floor, dt)

        d_all = (floor @ self._line_n.T - self._line_c) if n else np.zeros((0, len(self._line_names)))
        inside_list = inside.tolist()
        d_list = d_all.tolist()
        for k, tid in enumerate(ids):
            p = floor[k]
            d = d_list[k]
            if k >= n_seen:
                st = self._tracks.get(tid)
                if st is not None:  # else found again under a new id in this frame
                    st.seen_frame, st.painted_ts = frame, ts
                    self._step_zones(st, inside_list[k], ts, tid)
                continue
            st = self._tracks.get(tid)
            if st is not None and self._jumped(st, p, ts):
                self._orphan(tid)
                st = None
            st = st or self._reattach(tid, p, ts, ids[:n_seen])
            if st is None:
                st = self._tracks[tid] = _TrackState(ts, p, d, frame, boxes[k])
            else:
                if self._line_names:
                    self._step_lines(st, p, d, ts, tid)
                if frame - st.seen_frame > 1 and self._heat_cols:
                    self._paint_hidden(st, p, ts - dt, frame - st.seen_frame - 1, bucket)
                st.last_seen = ts
                st.seen_frame, st.painted_ts = frame, ts
                st.pos = p
                st.box = boxes[k]
                st.d = d
            st.trail.append((ts, p))
            st.covered = covered[k]
            self._step_zones(st, inside_list[k], ts, tid)

    def _place_hidden_feet(self, ids: list[int], feet: FloatArray, floor: FloatArray, boxes: FloatArray) -> None:
        """In place: the floor point of a person whose feet are hidden (behind someone nearer, or below
        the frame) from the top of their head and their height, which is learnt from the frames their
        feet were seen (person_height_m until a few frames agree, see _TrackState.height). The bottom of such a box is the top of whoever is
        in front, and taken as the feet it would put the person a metre or more too far away."""
        up = self._uprights
        assert up is not None
        size = self.config.homography.image_size
        assert size is not None  # uprights come only with it
        heads = head_points(boxes, self._vanishing_point)
        hidden = feet_hidden(boxes, feet, size[1])
        for k, tid in enumerate(ids):
            st = self._tracks.get(tid)
            if hidden[k]:
                h = self.config.person_height_m if st is None else st.height(self.config.person_height_m)
                q, q_taller = up.foot_of(np.repeat(heads[k:k + 1], 2, axis=0), [h, h + 0.1])
                # Only where the camera looks down steeply enough for it: seen from low down, 10 cm of
                # height moves the head's floor point by more than HEAD_PLACEMENT_M_PER_DM, worse than
                # the cut box it would replace.
                if np.isfinite(q).all() and np.hypot(*(q_taller - q)) <= HEAD_PLACEMENT_M_PER_DM:
                    floor[k] = q
                    self.counters["feet_from_head"] += 1
            elif st is not None:
                est = float(up.height_of(floor[k], heads[k])[0])
                if HEIGHT_RANGE_M[0] <= est <= HEIGHT_RANGE_M[1]:
                    st.heights.append(est)

    def _hidden(self, ids: list[int], boxes: FloatArray, ts: float) -> list[tuple[int, _TrackState]]:
        """Lost tracks presumed standing hidden behind someone: last seen standing still (not walking
        out of view), at most occlusion_hold_s ago, and their last box still at least HIDDEN_SHARE
        inside the box of a person nearer the camera (lower bottom edge) in this frame."""
        hold = self.config.occlusion_hold_s
        if hold <= 0 or not len(boxes):
            return []
        seen = set(ids)
        out = []
        for tid, st in self._tracks.items():
            if tid in seen or st.last_seen >= ts or ts - st.last_seen > hold or st.speed() > HOLD_MAX_SPEED_MPS:
                continue
            b = st.box[None, :]
            area = box_areas(b)[0]
            nearer = boxes[boxes[:, 3] > b[0, 3]]
            if area <= 0 or not len(nearer):
                continue
            if (box_intersections(b, nearer) >= HIDDEN_SHARE * area).any():
                st.hidden_ts = ts
                out.append((tid, st))
        self.counters["held_hidden"] += len(out)
        return out

    def _reachable(self, st: _TrackState, p: FloatArray, ts: float, speed: float) -> float | None:
        """How far ``p`` is from where the person of ``st`` would be by ``ts`` on their way, if they could
        have got there (within ``speed`` m/s of a change of pace or course, plus reattach_radius_m for
        the foot point's error); else None."""
        if st.hidden_ts > st.last_seen:  # held as hidden: standing where it was
            gap, there = ts - st.hidden_ts, st.pos
        else:  # walking on at the pace it had, most likely
            gap = ts - st.last_seen
            there = st.pos + st.velocity() * gap
        dist = math.hypot(float(p[0] - there[0]), float(p[1] - there[1]))
        return dist if dist <= self.config.reattach_radius_m + speed * gap else None

    def _jumped(self, st: _TrackState, p: FloatArray, ts: float) -> bool:
        """Whether the tracker's id went over to someone else: its foot point moved further than anyone
        moves in a store. Two people passing each other head-on in a doorway, one behind the other as
        the camera sees them, swap ids this way; whoever the id jumped from is lost at that point."""
        return self.config.reattach_speed_mps > 0 and self._reachable(st, p, ts, JUMP_SPEED_MPS) is None

    def _orphan(self, tid: int) -> None:
        """Re-key the state of ``tid`` to a fresh negative id (the tracker's are positive): the person it
        described is lost where last seen, open to reattachment, and ``tid`` starts over."""
        self._orphans -= 1
        st = self._tracks[self._orphans] = self._tracks.pop(tid)
        st.covered = True  # the id went to someone next to them: they are somewhere behind
        self.counters["identity_jumps"] += 1

    def _reattach(self, tid: int, p: FloatArray, ts: float, present: list[int]) -> _TrackState | None:
        """The state of the nearest lost track that could have walked to ``p`` by ``ts``, re-keyed to ``tid``."""
        cfg = self.config
        if cfg.reattach_speed_mps <= 0:
            return None
        best: tuple[float, int] | None = None
        for old, st in self._tracks.items():
            if st.last_seen >= ts or old in present or not st.covered:
                continue  # seen in this frame, or it was not going behind anyone: not hidden, gone
            dist = self._reachable(st, p, ts, cfg.reattach_speed_mps)
            if dist is not None and (best is None or dist < best[0]):
                best = (dist, old)
        if best is None:
            return None
        self.counters["reattached"] += 1
        st = self._tracks[tid] = self._tracks.pop(best[1])
        return st

    def _accept(self, tracks: Sequence[Track]) -> tuple[list[int], FloatArray, FloatArray, FloatArray]:
        """Filter one frame's tracks; returns their ids (ascending), foot points in the image (N, 2), floor
        points (N, 2) and boxes (N, 4)."""
        c = self.counters
        cfg = self.config
        # Sorted by id (then best confidence first) so the output never depends on list order.
        ordered = sorted(tracks, key=lambda t: (t.track_id, -t.conf if t.conf == t.conf else math.inf))
        ids: list[int] = []
        boxes: list[tuple[float, float, float, float]] = []
        prev: int | None = None
        for t in ordered:
            if t.track_id == prev:
                c["dropped_duplicate"] += 1
                continue
            prev = t.track_id
            x1, y1, x2, y2 = t.box
            if not (math.isfinite(x1) and math.isfinite(y1) and math.isfinite(x2) and math.isfinite(y2)
                    and x2 > x1 and y2 > y1 and math.isfinite(t.conf)):
                c["dropped_invalid"] += 1
                continue
            if t.conf < cfg.min_conf:
                c["dropped_conf"] += 1
                continue
            if y2 - y1 < cfg.min_box_height_px:
                c["dropped_small"] += 1
                continue
            ids.append(t.track_id)
            boxes.append((x1, y1, x2, y2))
        if not ids:
            return ids, np.zeros((0, 2)), np.zeros((0, 2)), np.zeros((0, 4))
        box_arr = np.array(boxes, dtype=np.float64)
        feet = foot_points(box_arr, self._vanishing_point)
        keep = np.ones(len(ids), dtype=bool)
        for m in self._masks:
            keep &= ~m.contains(feet)
        c["dropped_masked"] += int((~keep).sum())
        floor = self.homography.to_floor(feet)
        visible = np.isfinite(floor).all(axis=1)
        c["dropped_horizon"] += int((keep & ~visible).sum())
        keep &= visible
        if keep.all():
            return ids, feet, floor, box_arr
        return [i for i, k in zip(ids, keep.tolist(), strict=True) if k], feet[keep], floor[keep], box_arr[keep]

    def _paint_hidden(self, st: _TrackState, p: FloatArray, until: float, missed: int, now: _Bucket) -> None:
        """Paint the frames a track was not seen in, now that it is back: a person hidden behind another
        (or missed by the detector) for a moment was still on the floor, on the way from where they were
        last seen to where they are now. Frames are only filled in for a track that came back (within
        the grace), never for one that is gone; time without frames (a camera gap) is not filled in."""
        hidden = min(until - st.painted_ts, missed * self.config.max_frame_gap_s)
        if hidden <= 0:
            return
        f = (np.arange(1, missed + 1) / (missed + 1))[:, None]
        self.counters["heat_filled_frames"] += missed
        when = st.painted_ts + hidden / 2  # the unpainted time runs from painted_ts to until
        bs = self.config.bucket_s
        # Into the bucket of the hidden time, unless that one has been shipped already.
        bucket = now if math.floor(when / bs) * bs + bs <= self._watermark else self._bucket(when)
        self._paint(bucket, st.pos + f * (p - st.pos), hidden / missed)

    def _paint(self, bucket: _Bucket, floor: FloatArray, dt: float) -> None:
        hm = self.config.heatmap
        assert hm is not None
        col = np.floor((floor[:, 0] - hm.origin[0]) / hm.cell_m).astype(np.int64)
        row = np.floor((floor[:, 1] - hm.origin[1]) / hm.cell_m).astype(np.int64)
        on = (col >= 0) & (col < self._heat_cols) & (row >= 0) & (row < self._heat_rows)
        self.counters["heat_off_grid"] += int((~on).sum())
        np.add.at(bucket.heat, row[on] * self._heat_cols + col[on], dt)

    def _step_lines(self, st: _TrackState, p1: FloatArray, d1s: list[float], ts: float, tid: int) -> None:
        band = self._band
        p0 = st.pos
        for li, d1 in enumerate(d1s):
            d0 = st.d[li]
            if (d0 < 0) != (d1 < 0):
                # The foot point went from one side of the (infinite) line to the other between these
                # two frames: whether it did so through the doorway is where the straight path
                # between them meets the line. This is what catches a walker who crossed entirely
                # between two frames.
                t = d0 / (d0 - d1)
                q = p0 + t * (p1 - p0)
                s = float((q - self._line_a[li]) @ self._line_dir[li])
                st.cross_ok[li] = 0.0 <= s <= 1.0
            side = st.side[li]
            if side == 0:
                if d1 != 0 and abs(d1) >= band:
                    st.side[li] = 1 if d1 > 0 else -1
            elif d1 != 0 and side * d1 <= -band:
                # Clearly on the other side now: one crossing, however much it wobbled on the line.
                st.side[li] = -side
                if st.cross_ok[li]:
                    direction: Literal["in", "out"] = "in" if side < 0 else "out"
                    before = st.pending[li]
                    if before is not None and ts - before.ts <= self.config.line_confirm_s:
                        # Back across within the confirmation time: the foot point of someone standing
                        # in the doorway jumped (a box cut by someone in front), nobody went through.
                        st.pending[li] = None
                        self.counters["crossings_undone"] += 1
                    else:
                        if before is not None:
                            self._count(before)
                        st.pending[li] = Crossing(ts, tid, self._line_names[li], direction)
                st.cross_ok[li] = False

    def _settle(self, st: _TrackState, now: float) -> None:
        """Count the track's pending crossings that can no longer be undone by ``now``."""
        for li, c in enumerate(st.pending):
            if c is not None and now - c.ts > self.config.line_confirm_s:
                st.pending[li] = None
                self._count(c)

    def _count(self, c: Crossing) -> None:
        bucket = self._bucket(c.ts)
        if c.direction == "in":
            bucket.entries += 1
            self.counters["entries"] += 1
        else:
            bucket.exits += 1
            self.counters["exits"] += 1
        self._crossing_log.append(c)

    def _step_zones(self, st: _TrackState, inside: list[bool], ts: float, tid: int) -> None:
        visits = st.visits
        for zi, ins in enumerate(inside):
            v = visits.get(zi)
            if ins:
                if v is None:
                    visits[zi] = _OpenVisit(ts)
                else:
                    v.last_inside = ts
                    v.out_since = None
            elif v is not None:
                # Only time *seen* outside counts: while the track is occluded (within the track
                # grace) the visit neither grows nor ends.
                if v.out_since is None:
                    v.out_since = ts
                if ts - v.out_since >= self.config.zone_grace_s:
                    del visits[zi]
                    self._close(tid, zi, v)

    def _close(self, tid: int, zi: int, v: _OpenVisit) -> None:
        # The visit ends when the person was last seen inside, not when we noticed they had gone.
        seconds = v.last_inside - v.enter
        if seconds < self.config.min_dwell_s:
            self.counters["short_visits"] += 1
            return
        self.counters["visits"] += 1
        self._bucket(v.last_inside).dwells[zi].append(seconds)
        self._visit_log.append(Visit(tid, self._zone_names[zi], v.enter, v.last_inside, seconds))

    def _expire(self, now: float) -> None:
        grace = self.config.track_grace_s
        gone = [tid for tid, st in self._tracks.items() if now - max(st.last_seen, st.hidden_ts) > grace]
        for st in self._tracks.values():
            self._settle(st, now)
        for tid in gone:
            st = self._tracks.pop(tid)
            self._settle(st, math.inf)  # it went through and out of view: nothing can undo it now
            for zi, v in sorted(st.visits.items()):
                self._close(tid, zi, v)

    def _bucket(self, ts: float) -> _Bucket:
        start = math.floor(ts / self.config.bucket_s) * self.config.bucket_s
        b = self._buckets.get(start)
        if b is None:
            cells = self._heat_cols * self._heat_rows
            b = self._buckets[start] = _Bucket(start, len(self._zones) + 1, len(self._zones), cells)
        return b

    # ------------------------------------------------------------ output

    def flush(self, until_ts: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Take every finished bucket ending at or before ``until_ts`` as (stats items, heatmap items).

        ``until_ts`` is a watermark: pass the latest frame's timestamp (or the clock's time when the
        camera is down); frames older than it are dropped afterwards. Tracks unseen for longer than
        the grace by then are closed. A bucket stays back while a visit that may still end in it is
        open (someone last seen inside it, within the grace), so a visit is always reported in the
        bucket of its leave time: at most ``track_grace_s`` (or zone grace plus a frame) of delay.
        """
        if not math.isfinite(until_ts):
            # NaN compares false with every bucket end and would ship buckets still being filled.
            raise ValueError(f"flush needs a finite timestamp, got {until_ts!r}")
        self._watermark = max(self._watermark, until_ts)
        self._expire(until_ts)
        hold = min(
            (v.last_inside for st in self._tracks.values() for v in st.visits.values()), default=math.inf
        )
        hold = min(hold, min((c.ts for st in self._tracks.values() for c in st.pending if c), default=math.inf))
        stats: list[dict[str, Any]] = []
        heat: list[dict[str, Any]] = []
        bs = self.config.bucket_s
        for start in sorted(self._buckets):
            end = start + bs
            if end > until_ts or end > hold:
                break
            b = self._buckets.pop(start)
            stats.extend(self._stats_items(b))
            if self.config.heatmap is not None:
                heat.append(self._heat_item(b))
        return stats, heat

    def _stats_items(self, b: _Bucket) -> list[dict[str, Any]]:
        cfg = self.config
        avg = b.occ_wsum / b.weight if b.weight > 0 else b.occ_sum / b.frames
        common = {"camera": cfg.camera, "bucket_start": rfc3339(float(b.start)), "bucket_s": cfg.bucket_s}

        def occ(i: int) -> dict[str, float]:
            return {
                "occupancy_min": float(b.occ_min[i]),
                "occupancy_avg": round(float(avg[i]), 4),
                "occupancy_max": float(b.occ_max[i]),
            }

        items: list[dict[str, Any]] = [
            {**common, "zone": None, "entries": b.entries, "exits": b.exits, **occ(0), "visits": 0,
             "dwell_edges_s": [], "dwell_hist": [], "dwell_median_s": None}
        ]
        for zi, name in enumerate(self._zone_names):
            dwells = b.dwells[zi]
            items.append({
                **common, "zone": name, "entries": 0, "exits": 0, **occ(zi + 1), "visits": len(dwells),
                "dwell_edges_s": list(cfg.dwell_edges_s), "dwell_hist": _histogram(self._edges, dwells),
                "dwell_median_s": round(statistics.median(dwells), 3) if dwells else None,
            })
        return items

    def _heat_item(self, b: _Bucket) -> dict[str, Any]:
        hm = self.config.heatmap
        assert hm is not None
        return {
            "camera": self.config.camera,
            "bucket_start": rfc3339(float(b.start)),
            "bucket_s": self.config.bucket_s,
            "cell_m": hm.cell_m,
            "cols": self._heat_cols,
            "rows": self._heat_rows,
            "cells": np.round(b.heat, 3).tolist(),
            "origin": list(hm.origin),
            "doors": [{"name": n, "a": list(ln.a), "b": list(ln.b)} for n, ln in self.config.lines.items()],
        }

    def pop_visits(self) -> list[Visit]:
        """Counted visits closed since the last call (the newest LOG_KEEP if nobody drains them)."""
        out = list(self._visit_log)
        self._visit_log.clear()
        return out

    def pop_crossings(self) -> list[Crossing]:
        """Counted line crossings since the last call (the newest LOG_KEEP if nobody drains them)."""
        out = list(self._crossing_log)
        self._crossing_log.clear()
        return out

    @property
    def active_tracks(self) -> int:
        return len(self._tracks)


COVERED_SHARE = 0.1  # of a box's area under another box: the start of an occlusion


def _covered(boxes: FloatArray) -> NDArray[np.bool_]:
    """For each box (N, 4), whether other boxes cover at least COVERED_SHARE of its area."""
    n = len(boxes)
    if n < 2:
        return np.zeros(n, dtype=bool)
    inter = box_intersections(boxes, boxes)
    np.fill_diagonal(inter, 0.0)
    return inter.max(axis=1) >= COVERED_SHARE * box_areas(boxes)


def _histogram(edges: FloatArray, values: Iterable[float]) -> list[int]:
    """len(edges) + 1 bins: [0, e0), [e0, e1), ..., [e_last, inf), as edge_agent.sync.compaction reads them."""
    idx = np.searchsorted(edges, np.fromiter(values, dtype=np.float64), side="right")
    return np.bincount(idx, minlength=len(edges) + 1).tolist()
