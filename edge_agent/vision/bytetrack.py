"""ByteTrack: the people boxes of consecutive frames joined into tracks, with numpy and lapjv only (no torch).

A port of ultralytics' BYTETracker (8.4.190: trackers/byte_tracker.py, utils/kalman_filter.py KalmanFilterXYAH,
utils/matching.py; AGPL-3.0), itself after ByteTrack (Zhang et al., ECCV 2022, MIT). It keeps their rules and
their arithmetic, so the lean runtime tracks as the ultralytics runtime does: tests/test_vision_bytetrack.py
runs both on the same detections and expects the same ids and boxes. Parameters are those of ultralytics'
bytetrack.yaml, under the same names. The rules, for each frame (``update``):

- **Split.** Detections with a box of no width or height are dropped; the rest are *high*
  (score >= ``track_high_thresh``) or *low* (``track_low_thresh`` < score < ``track_high_thresh``).
- **Predict.** Every confirmed track, tracked or lost, moves one frame ahead on a constant-velocity Kalman
  filter of (centre x, centre y, width/height, height); a lost track's height stops changing.
- **First match.** Confirmed tracks (tracked and lost) against high detections, cost 1 - IoU (times the
  detection's score with ``fuse_score``), solved with lapjv; a pair costing more than ``match_thresh`` is no
  match. A tracked track takes its detection; a lost one is found again, keeping its id.
- **Second match.** Tracked tracks left over against low detections, cost 1 - IoU, no match above 0.5: a
  person partly hidden (a weak box) keeps their track. Tracks still left over are lost.
- **Unconfirmed.** Tracks started on the previous frame and not matched since meet the high detections left
  over (the first match's cost, no match above 0.7); one left over is removed.
- **Birth.** A high detection still left over with score >= ``new_track_thresh`` starts a track with the next
  id (ids count from 1 per tracker). It is reported once it is matched again (at once on the first frame).
- **Death.** A lost track is removed ``track_buffer`` frames after its last match. As in ultralytics, it
  stays in the lost pool for one more frame, where it can still be found again; a track that was once
  removed and is lost again is dropped at once.
- **Duplicates.** A tracked and a lost track whose boxes overlap at IoU > 0.85 are one person: the one
  tracked for fewer frames goes.

``update`` returns the confirmed, tracked tracks: each with the Kalman filter's box (not the raw
detection's), the score and class of the detection it took, and that detection's index.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import IntEnum

import lap
import numpy as np
from numpy.typing import NDArray

__all__ = ["ByteTrackParams", "ByteTracker", "TrackedBox"]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

UNCONFIRMED_MATCH = 0.7  # ultralytics' fixed cost limit for tracks not yet confirmed
LOW_MATCH = 0.5  # and for the second (low-score) match
DUPLICATE_IOU_DISTANCE = 0.15  # tracked and lost tracks closer than this (1 - IoU) are one person
REMOVED_MEMORY = 1000  # removed track ids remembered (ultralytics' removed_stracks buffer)


@dataclass(frozen=True, slots=True)
class ByteTrackParams:
    """ultralytics' bytetrack.yaml, key for key (its ``tracker_type`` aside), with its default values."""

    track_high_thresh: float = 0.25
    track_low_thresh: float = 0.1
    new_track_thresh: float = 0.25
    track_buffer: int = 30  # frames
    match_thresh: float = 0.8
    fuse_score: bool = True

    @classmethod
    def with_overrides(cls, overrides: dict[str, float | int | bool]) -> ByteTrackParams:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown ByteTrack keys {sorted(unknown)}; it has {sorted(known)}")
        return cls(**overrides)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class TrackedBox:
    track_id: int
    box: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float
    cls: int
    det_index: int  # index of the detection in this frame's input


class _State(IntEnum):
    NEW = 0
    TRACKED = 1
    LOST = 2
    REMOVED = 3


class _Kalman:
    """KalmanFilterXYAH: state (x, y, a, h, vx, vy, va, vh); noise relative to the height h."""

    POS = 1.0 / 20
    VEL = 1.0 / 160

    def __init__(self) -> None:
        self.motion = np.eye(8)
        self.motion[:4, 4:] = np.eye(4)

    def initiate(self, xyah: F32 | F64) -> tuple[F64, F64]:
        xyah = np.asarray(xyah, dtype=np.float64)
        h = xyah[3]
        std = [2 * self.POS * h, 2 * self.POS * h, 1e-2, 2 * self.POS * h,
               10 * self.VEL * h, 10 * self.VEL * h, 1e-5, 10 * self.VEL * h]
        return np.r_[xyah, np.zeros(4)], np.diag(np.square(std))

    def multi_predict(self, mean: F64, cov: F64) -> tuple[F64, F64]:
        h = mean[:, 3]
        std = np.r_[[self.POS * h, self.POS * h, 1e-2 * np.ones_like(h), self.POS * h],
                    [self.VEL * h, self.VEL * h, 1e-5 * np.ones_like(h), self.VEL * h]]
        motion_cov = np.zeros((len(mean), 8, 8))
        motion_cov[:, range(8), range(8)] = np.square(std).T
        mean = np.dot(mean, self.motion.T)
        cov = np.dot(np.dot(self.motion, cov).transpose((1, 0, 2)), self.motion.T) + motion_cov
        return mean, cov

    def update(self, mean: F64, cov: F64, xyah: F32 | F64) -> tuple[F64, F64]:
        h = mean[3]
        innovation_cov = np.diag(np.square([self.POS * h, self.POS * h, 1e-1, self.POS * h]))
        projected_cov = cov[:4, :4] + innovation_cov
        gain = np.linalg.solve(projected_cov, cov[:, :4].T).T
        mean = mean + np.dot(xyah - mean[:4], gain.T)
        cov = cov - np.linalg.multi_dot((gain, projected_cov, gain.T))
        return mean, cov


def _xyah(tlwh: F32 | F64) -> F32 | F64:
    """(centre x, centre y, width / height, height), in the box's own precision as ultralytics computes it."""
    out = np.array(tlwh, copy=True)
    out[:2] += out[2:] / 2
    out[2] /= out[3]
    return out


class _Track:
    """A detection of this frame (state NEW, no Kalman state yet) or a track."""

    __slots__ = ("tlwh0", "score", "cls", "det_index", "track_id", "state", "activated", "mean", "cov",
                 "frame_id", "start_frame")

    def __init__(self, tlwh: F32, score: float, cls: int, det_index: int) -> None:
        self.tlwh0 = tlwh
        self.score = score
        self.cls = cls
        self.det_index = det_index
        self.track_id = 0
        self.state = _State.NEW
        self.activated = False
        self.mean: F64 | None = None
        self.cov: F64 | None = None
        self.frame_id = 0
        self.start_frame = 0

    @property
    def tlwh(self) -> F32 | F64:
        if self.mean is None:
            return self.tlwh0.copy()
        ret = self.mean[:4].copy()
        ret[2] *= ret[3]
        ret[:2] -= ret[2:] / 2
        return ret

    @property
    def xyxy(self) -> F32 | F64:
        ret = self.tlwh
        ret[2:] += ret[:2]
        return ret

    def take(self, det: _Track, frame_id: int, kf: _Kalman) -> None:
        """Update (a tracked track) or find again (a lost one) with a matched detection."""
        assert self.mean is not None and self.cov is not None
        self.mean, self.cov = kf.update(self.mean, self.cov, _xyah(det.tlwh))
        self.state = _State.TRACKED
        self.activated = True
        self.frame_id = frame_id
        self.score, self.cls, self.det_index = det.score, det.cls, det.det_index


def _iou_cost(a: list[_Track], b: list[_Track]) -> F32:
    """1 - IoU of every pair, as ultralytics computes it (float32, eps 1e-7)."""
    if not a or not b:
        return np.ones((len(a), len(b)), dtype=np.float32)
    p = np.ascontiguousarray([t.xyxy for t in a], dtype=np.float32)
    q = np.ascontiguousarray([t.xyxy for t in b], dtype=np.float32)
    inter = (np.minimum(p[:, None, 2], q[:, 2]) - np.maximum(p[:, None, 0], q[:, 0])).clip(0) * (
        np.minimum(p[:, None, 3], q[:, 3]) - np.maximum(p[:, None, 1], q[:, 1])).clip(0)
    area_p = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    area_q = (q[:, 2] - q[:, 0]) * (q[:, 3] - q[:, 1])
    return 1 - inter / (area_q + area_p[:, None] - inter + 1e-7)


def _assign(cost: NDArray[np.floating], thresh: float) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """Matched (row, column) pairs and the unmatched rows and columns, lapjv with a cost limit."""
    if cost.size == 0:
        return [], list(range(cost.shape[0])), list(range(cost.shape[1]))
    _, x, y = lap.lapjv(cost, extend_cost=True, cost_limit=thresh)
    matches = [(i, int(j)) for i, j in enumerate(x) if j >= 0]
    return matches, [int(i) for i in np.where(x < 0)[0]], [int(j) for j in np.where(y < 0)[0]]


def _join(a: list[_Track], b: list[_Track]) -> list[_Track]:
    ids = {t.track_id for t in a}
    return a + [t for t in b if t.track_id not in ids]


def _without(a: list[_Track], ids: set[int] | list[int]) -> list[_Track]:
    drop = set(ids)
    return [t for t in a if t.track_id not in drop]


class ByteTracker:
    """One camera's tracker; ``update`` once a frame, ``reset`` for a new stream (ids start again at 1)."""

    def __init__(self, params: ByteTrackParams | None = None) -> None:
        self.params = params or ByteTrackParams()
        self._kf = _Kalman()
        self.reset()

    def reset(self) -> None:
        self._tracked: list[_Track] = []
        self._lost: list[_Track] = []
        self._removed_ids: list[int] = []
        self._frame = 0
        self._next_id = 1

    def _fuse(self, cost: F32, dets: list[_Track]) -> F32:
        if not self.params.fuse_score or cost.size == 0:
            return cost
        scores = np.array([d.score for d in dets])[None].repeat(cost.shape[0], axis=0)
        return 1 - (1 - cost) * scores

    def update(self, xyxy: F32, scores: F32, classes: NDArray[np.integer]) -> list[TrackedBox]:
        """Feed one frame's detections (boxes x1, y1, x2, y2, their scores and classes)."""
        p = self.params
        self._frame += 1
        frame = self._frame
        xyxy = np.asarray(xyxy, dtype=np.float32).reshape(-1, 4)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        # xywh as ultralytics' Boxes computes it (float32), then top-left corner in float64 as its tracker does.
        wh = xyxy[:, 2:] - xyxy[:, :2]
        centre = (xyxy[:, :2] + xyxy[:, 2:]) / 2
        tlwh = np.concatenate([centre.astype(np.float64) - wh.astype(np.float64) / 2, wh], axis=1).astype(np.float32)
        valid = (wh[:, 0] > 0) & (wh[:, 1] > 0)
        high = valid & (scores >= p.track_high_thresh)
        low = valid & (scores > p.track_low_thresh) & (scores < p.track_high_thresh)
        dets = [_Track(tlwh[i], scores[i], int(classes[i]), int(i)) for i in np.flatnonzero(high)]
        dets_low = [_Track(tlwh[i], scores[i], int(classes[i]), int(i)) for i in np.flatnonzero(low)]

        activated: list[_Track] = []
        refound: list[_Track] = []
        lost: list[_Track] = []
        removed: list[_Track] = []
        unconfirmed = [t for t in self._tracked if not t.activated]
        confirmed = [t for t in self._tracked if t.activated]
        pool = _join(confirmed, self._lost)
        if pool:
            mean = np.asarray([t.mean for t in pool])
            cov = np.asarray([t.cov for t in pool])
            for i, t in enumerate(pool):
                if t.state != _State.TRACKED:
                    mean[i][7] = 0
            mean, cov = self._kf.multi_predict(mean, cov)
            for t, m, c in zip(pool, mean, cov, strict=True):
                t.mean, t.cov = m, c

        def apply(pairs: list[tuple[int, int]], tracks: list[_Track], found: list[_Track]) -> None:
            for it, idet in pairs:
                track = tracks[it]
                (activated if track.state == _State.TRACKED else refound).append(track)
                track.take(found[idet], frame, self._kf)

        # First match: confirmed tracks and high detections.
        matches, u_track, u_det = _assign(self._fuse(_iou_cost(pool, dets), dets), p.match_thresh)
        apply(matches, pool, dets)
        # Second match: tracks still tracked and low detections, IoU only.
        rest = [pool[i] for i in u_track if pool[i].state == _State.TRACKED]
        if rest and dets_low:
            matches, u_rest, _ = _assign(_iou_cost(rest, dets_low), LOW_MATCH)
            apply(matches, rest, dets_low)
        else:
            u_rest = list(range(len(rest)))
        for i in u_rest:
            rest[i].state = _State.LOST
            lost.append(rest[i])
        # Unconfirmed tracks and the high detections left over.
        dets = [dets[i] for i in u_det]
        if unconfirmed:
            matches, u_unconfirmed, u_det = _assign(self._fuse(_iou_cost(unconfirmed, dets), dets),
                                                     UNCONFIRMED_MATCH)
            for it, idet in matches:
                unconfirmed[it].take(dets[idet], frame, self._kf)
                activated.append(unconfirmed[it])
            for it in u_unconfirmed:
                unconfirmed[it].state = _State.REMOVED
                removed.append(unconfirmed[it])
        else:
            u_det = list(range(len(dets)))
        # Births.
        for i in u_det:
            t = dets[i]
            if t.score < p.new_track_thresh:
                continue
            t.track_id = self._next_id
            self._next_id += 1
            t.mean, t.cov = self._kf.initiate(_xyah(t.tlwh0))
            t.state = _State.TRACKED
            t.activated = frame == 1
            t.frame_id = t.start_frame = frame
            activated.append(t)
        # Deaths.
        for t in self._lost:
            if frame - t.frame_id > p.track_buffer:
                t.state = _State.REMOVED
                removed.append(t)

        # The pools, as ultralytics' merge_track_pools leaves them (the removed ids of this frame are only
        # taken out of the lost pool on the next one).
        tracked = [t for t in self._tracked if t.state == _State.TRACKED]
        tracked = _join(_join(tracked, activated), refound)
        lost_pool = _without(self._lost, {t.track_id for t in tracked}) + lost
        lost_pool = _without(lost_pool, self._removed_ids)
        self._tracked, self._lost = self._drop_duplicates(tracked, lost_pool)
        self._removed_ids = (self._removed_ids + [t.track_id for t in removed])[-REMOVED_MEMORY:]
        return [TrackedBox(t.track_id, tuple(float(v) for v in np.asarray(t.xyxy, dtype=np.float32)),  # type: ignore[arg-type]
                           float(t.score), t.cls, t.det_index)
                for t in self._tracked if t.activated]

    @staticmethod
    def _drop_duplicates(tracked: list[_Track], lost: list[_Track]) -> tuple[list[_Track], list[_Track]]:
        dup_t: set[int] = set()
        dup_l: set[int] = set()
        for i, j in zip(*np.where(_iou_cost(tracked, lost) < DUPLICATE_IOU_DISTANCE), strict=True):
            # The one followed for fewer frames goes; on a tie, the tracked one.
            if tracked[i].frame_id - tracked[i].start_frame > lost[j].frame_id - lost[j].start_frame:
                dup_l.add(int(j))
            else:
                dup_t.add(int(i))
        return ([t for i, t in enumerate(tracked) if i not in dup_t],
                [t for j, t in enumerate(lost) if j not in dup_l])
