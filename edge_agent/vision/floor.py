"""Floor mapping: image pixels -> floor-plan metres through a planar homography, and polygon geometry.

Pure numpy; no OpenCV, so the analytics can run (and be tested) without the vision extras installed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]

# Relative tolerances on *normalised* coordinates (mean distance sqrt(2) from the centroid), so they
# do not depend on whether the input is in pixels, metres or millimetres.
_COLLINEAR_TOL = 1e-9
_RANK_TOL = 1e-9
# A point whose projective scale is this close to zero sits on the horizon: its floor position is
# at infinity, and anything past it would be mirrored back onto the floor, so we refuse to map it.
_HORIZON_TOL = 1e-12


def _as_points(pts: ArrayLike, what: str) -> FloatArray:
    a = np.asarray(pts, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{what} must be a sequence of (x, y) pairs, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contain a non-finite coordinate")
    return a


def _normaliser(pts: FloatArray) -> FloatArray:
    """Hartley normalisation: centroid to the origin, mean distance sqrt(2).

    Without it the DLT system mixes pixel values (~1e3) with their squares (~1e6) and the least
    squares solution is dominated by rounding, not by the data.
    """
    c = pts.mean(axis=0)
    d = np.sqrt(((pts - c) ** 2).sum(axis=1)).mean()
    s = np.sqrt(2.0) / d
    return np.array([[s, 0.0, -s * c[0]], [0.0, s, -s * c[1]], [0.0, 0.0, 1.0]])


def _apply(h: FloatArray, pts: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Projective map; returns (cartesian points, projective scale w)."""
    x = pts[:, 0]
    y = pts[:, 1]
    w = h[2, 0] * x + h[2, 1] * y + h[2, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        u = (h[0, 0] * x + h[0, 1] * y + h[0, 2]) / w
        v = (h[1, 0] * x + h[1, 1] * y + h[1, 2]) / w
    return np.stack([u, v], axis=1), w


def _check_spread(pts: FloatArray, what: str) -> None:
    n = len(pts)
    t = _normaliser(pts) if np.ptp(pts, axis=0).max() > 0 else None
    if t is None:
        raise ValueError(f"{what} are all the same point")
    p = pts @ t[:2, :2].T + t[:2, 2]
    for i, j in combinations(range(n), 2):
        if np.hypot(*(p[i] - p[j])) < 1e-9:
            raise ValueError(f"{what} {i} and {j} coincide")
    sv = np.linalg.svd(p - p.mean(axis=0), compute_uv=False)
    if sv[1] < _COLLINEAR_TOL * sv[0] * np.sqrt(n):
        raise ValueError(f"{what} are collinear: a homography needs points spread over the plane")
    if n == 4:
        # Exactly determined: three collinear points out of four leave a family of solutions.
        for tri in combinations(range(4), 3):
            a, b, c = p[list(tri)]
            if abs((b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])) < 1e-6:
                raise ValueError(f"{what} {tri} are collinear: with four pairs no three may lie on a line")


@dataclass(frozen=True)
class Homography:
    """A planar projective map from image pixels to floor metres (``matrix``), and back."""

    matrix: FloatArray
    inverse: FloatArray
    rms_error_m: float  # of the calibration points, to spot a mistyped pair at config time
    _side: float  # sign of w over the calibration points: the floor's side of the horizon

    @classmethod
    def from_points(cls, image_pts: ArrayLike, floor_pts: ArrayLike) -> Homography:
        """Least-squares normalised DLT from >= 4 (image pixel, floor metre) pairs.

        Raises ValueError with the reason for too few, non-finite, duplicate, collinear or otherwise
        degenerate pairs, and for pairs that put the horizon between calibration points (which is
        what mis-ordered pairs do: a real floor seen by a camera lies entirely on one side of it).
        """
        img = _as_points(image_pts, "image points")
        flr = _as_points(floor_pts, "floor points")
        if len(img) != len(flr):
            raise ValueError(f"{len(img)} image points but {len(flr)} floor points: they must pair up")
        if len(img) < 4:
            raise ValueError(f"a homography needs at least 4 point pairs, got {len(img)}")
        _check_spread(img, "image points")
        _check_spread(flr, "floor points")

        ti, tf = _normaliser(img), _normaliser(flr)
        pi = img @ ti[:2, :2].T + ti[:2, 2]
        pf = flr @ tf[:2, :2].T + tf[:2, 2]
        n = len(img)
        x, y, u, v = pi[:, 0], pi[:, 1], pf[:, 0], pf[:, 1]
        zeros, ones = np.zeros(n), np.ones(n)
        a = np.empty((2 * n, 9))
        a[0::2] = np.stack([-x, -y, -ones, zeros, zeros, zeros, u * x, u * y, u], axis=1)
        a[1::2] = np.stack([zeros, zeros, zeros, -x, -y, -ones, v * x, v * y, v], axis=1)
        _, s, vt = np.linalg.svd(a)
        # The solution is the right singular vector of the smallest singular value; it is unique
        # only if the next one is clearly non-zero (a one-dimensional null space).
        if s[7] < _RANK_TOL * s[0]:
            raise ValueError("degenerate point pairs: they do not determine a unique homography")
        hn = vt[-1].reshape(3, 3)
        h = np.linalg.inv(tf) @ hn @ ti
        if np.linalg.cond(h) > 1e12:
            raise ValueError("degenerate point pairs: the fitted homography is singular")
        h = h / (h[2, 2] if abs(h[2, 2]) > 1e-12 else np.linalg.norm(h))

        mapped, w = _apply(h, img)
        if not (np.all(w > 0) or np.all(w < 0)):
            raise ValueError(
                "the horizon passes between calibration points: check that the image and floor points "
                "are listed in the same order"
            )
        side = 1.0 if w[0] > 0 else -1.0
        rms = float(np.sqrt(((mapped - flr) ** 2).sum(axis=1).mean()))
        hinv = np.linalg.inv(h)
        hinv = hinv / (hinv[2, 2] if abs(hinv[2, 2]) > 1e-12 else np.linalg.norm(hinv))
        h.setflags(write=False)
        hinv.setflags(write=False)
        return cls(h, hinv, rms, side)

    def to_floor(self, points: ArrayLike) -> FloatArray:
        """Image pixels (N, 2) -> floor metres (N, 2); NaN rows for points on or above the horizon."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        out, w = _apply(self.matrix, p)
        out[~(w * self._side > _HORIZON_TOL)] = np.nan
        return out

    def to_image(self, points: ArrayLike) -> FloatArray:
        """Floor metres (N, 2) -> image pixels (N, 2); for drawing zones and for the simulator."""
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        out, w = _apply(self.inverse, p)
        out[~(np.abs(w) > _HORIZON_TOL)] = np.nan
        return out


    def uprights(self, principal_point: ArrayLike) -> Uprights | None:
        """The camera's view of upright things (people) standing on this floor, or None.

        A floor homography is K [r1 r2 t] up to scale. For a camera with square pixels, no skew and a
        known principal point (the image centre, for nearly every camera), r1 . r2 = 0 and |r1| = |r2|
        are two linear equations in 1 / f^2 (either alone is singular for some poses: the first when
        the camera's view is square to the floor's axes); then r3 = r1 x r2 is the vertical, and a
        point h metres above floor point (x, y) is imaged at G (x, y, 1) + h K r3. None when no such
        camera fits the calibration (|r1| and |r2| still disagree): then nothing is assumed."""
        c = np.asarray(principal_point, dtype=np.float64).reshape(2)
        t = np.array([[1.0, 0.0, -c[0]], [0.0, 1.0, -c[1]], [0.0, 0.0, 1.0]])
        g0 = np.asarray(self.inverse, dtype=np.float64) / np.linalg.norm(self.inverse)  # floor -> image
        g = t @ g0
        h1, h2 = g[:, 0], g[:, 1]
        a1, a0 = h1[0] * h2[0] + h1[1] * h2[1], h1[2] * h2[2]
        b1, b0 = h1[0] ** 2 + h1[1] ** 2 - h2[0] ** 2 - h2[1] ** 2, h1[2] ** 2 - h2[2] ** 2
        if a1 * a1 + b1 * b1 < 1e-18:
            return None
        w = -(a1 * a0 + b1 * b0) / (a1 * a1 + b1 * b1)  # 1 / f^2, least squares
        if not w > 0:
            return None
        f = 1.0 / np.sqrt(w)
        k, kinv = np.diag([f, f, 1.0]), np.diag([1.0 / f, 1.0 / f, 1.0])
        r1, r2 = kinv @ h1, kinv @ h2
        n1, n2 = np.linalg.norm(r1), np.linalg.norm(r2)
        if abs(n1 - n2) > 0.1 * max(n1, n2):
            return None
        lam = 0.5 * (n1 + n2)
        r3 = np.cross(r1, r2) / (lam * lam)
        # Signs: a floor point the camera sees has positive depth (the third coordinate); then the
        # camera centre, -R^T t, must be above the floor, else the floor's axes are mirrored and the
        # vertical as computed points down.
        seen = next((q for q in self.to_floor([c, (c[0], 1.5 * c[1]), (c[0], 2.0 * c[1] - 1.0)])
                     if np.isfinite(q).all()), None)
        if seen is None:
            return None
        sign = 1.0 if (g @ np.array([seen[0], seen[1], 1.0]))[2] > 0 else -1.0
        r3 = r3 * (1.0 if -(r3 @ (kinv @ (sign * g[:, 2]) / lam)) > 0 else -1.0)
        # Image pixels, homogeneous, in the scale of floor_to_image (the sign-corrected, normalised G).
        return Uprights(sign * g0, np.linalg.inv(t) @ k @ (r3 * lam))


@dataclass(frozen=True)
class Uprights:
    """Where a point ``h`` metres above floor point (x, y) appears: ``floor_to_image @ (x, y, 1) + h * up``
    (homogeneous image pixels). From ``Homography.uprights``."""

    floor_to_image: FloatArray
    up: FloatArray

    @property
    def vanishing_point(self) -> FloatArray | None:
        """Image point where the images of vertical lines meet, or None if they stay parallel. A camera
        that looks down through a wide lens images upright people leaning away from the image centre,
        towards this point."""
        if abs(self.up[2]) < 1e-12 * np.linalg.norm(self.up):
            return None  # the vertical is parallel to the image plane: verticals stay parallel
        return self.up[:2] / self.up[2]

    def height_of(self, floor: ArrayLike, head: ArrayLike) -> FloatArray:
        """Height (m) of the point imaged at ``head`` (N, 2) straight above floor points (N, 2)."""
        f = np.asarray(floor, dtype=np.float64).reshape(-1, 2)
        v = np.asarray(head, dtype=np.float64).reshape(-1, 2)[:, 1]
        a = np.c_[f, np.ones(len(f))] @ self.floor_to_image.T
        b = self.up
        with np.errstate(divide="ignore", invalid="ignore"):
            return (v * a[:, 2] - a[:, 1]) / (b[1] - v * b[2])

    def foot_of(self, head: ArrayLike, height_m: ArrayLike) -> FloatArray:
        """Floor points (N, 2) under image points ``head`` (N, 2) that are ``height_m`` above the floor."""
        hp = np.asarray(head, dtype=np.float64).reshape(-1, 2)
        hs = np.broadcast_to(np.asarray(height_m, dtype=np.float64), (len(hp),))
        out = np.full((len(hp), 2), np.nan)
        for i, ((u, v), h) in enumerate(zip(hp, hs, strict=True)):
            m = self.floor_to_image.copy()
            m[:, 2] += h * self.up
            try:
                q = np.linalg.solve(m, np.array([u, v, 1.0]))
            except np.linalg.LinAlgError:
                continue
            if abs(q[2]) > 1e-12:
                out[i] = q[:2] / q[2]
        return out


def _on_axis(b: FloatArray, y: FloatArray, vanishing_point: ArrayLike | None) -> FloatArray:
    """x where the axis of each box (through its centre, towards the vertical vanishing point when
    that lies below the box) meets height y; the box's centre line without one."""
    x = (b[:, 0] + b[:, 2]) * 0.5
    if vanishing_point is None or not len(b):
        return x
    vx, vy = np.asarray(vanishing_point, dtype=np.float64).reshape(2)
    my = (b[:, 1] + b[:, 3]) * 0.5
    below = vy > b[:, 3]  # a camera looking down: the point lies below the feet
    with np.errstate(divide="ignore", invalid="ignore"):
        axis = x + (vx - x) * (y - my) / (vy - my)
    return np.where(below, np.clip(axis, b[:, 0], b[:, 2]), x)


def foot_points(boxes: ArrayLike, vanishing_point: ArrayLike | None = None) -> FloatArray:
    """Where the people in (N, 4) boxes x1, y1, x2, y2 stand: the bottom-centre of each box.

    With the vertical vanishing point of the camera (``Uprights.vanishing_point``), a box of a person
    leaning in the image is followed along their axis instead: from the box centre towards the
    vanishing point down to the box's bottom edge, so a person near the image edge of a
    downward-looking camera is not placed half a body-lean to the side."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([_on_axis(b, b[:, 3], vanishing_point), b[:, 3]], axis=1)


def head_points(boxes: ArrayLike, vanishing_point: ArrayLike | None = None) -> FloatArray:
    """The top of each person's axis (see foot_points): the top of the head."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.stack([_on_axis(b, b[:, 1], vanishing_point), b[:, 1]], axis=1)


def box_intersections(a: ArrayLike, b: ArrayLike) -> FloatArray:
    """(N, M) areas of overlap of boxes a (N, 4) with boxes b (M, 4), x1, y1, x2, y2."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    w = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    h = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    return w * h


def box_areas(boxes: ArrayLike) -> FloatArray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])


def feet_hidden(boxes: ArrayLike, feet: ArrayLike, image_height: float | None = None) -> NDArray[np.bool_]:
    """For each box (N, 4), whether its bottom edge is not the person's feet: another person stands
    nearer the camera (their box's bottom lower) with their box over this one's foot point, or the
    box reaches the bottom of the frame."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    fx = np.asarray(feet, dtype=np.float64).reshape(-1, 2)[:, 0]
    x1, y1, x2, y2 = (b[:, i] for i in range(4))
    hides = ((y2[None, :] > y2[:, None] + 1.0) & (x1[None, :] <= fx[:, None]) & (fx[:, None] <= x2[None, :])
             & (y1[None, :] < y2[:, None]))
    out = hides.any(axis=1)
    if image_height is not None:
        out |= y2 >= image_height - 1.0
    return out


# ---------------------------------------------------------------- polygons


@dataclass(frozen=True)
class Polygon:
    """A simple polygon (convex or not) with its edges precomputed for a vectorised even-odd test."""

    vertices: FloatArray
    _x1: FloatArray
    _y1: FloatArray
    _y2: FloatArray
    _inv_slope: FloatArray

    @classmethod
    def of(cls, vertices: ArrayLike) -> Polygon:
        v = _as_points(vertices, "polygon vertices")
        if len(v) < 3:
            raise ValueError(f"a polygon needs at least 3 vertices, got {len(v)}")
        nxt = np.roll(v, -1, axis=0)
        dx, dy = nxt[:, 0] - v[:, 0], nxt[:, 1] - v[:, 1]
        # Horizontal edges never straddle a horizontal ray; give them any finite slope.
        inv = np.divide(dx, dy, out=np.zeros_like(dx), where=dy != 0)
        for a in (v, v[:, 0], v[:, 1], nxt[:, 1], inv):
            a.setflags(write=False)
        return cls(v, v[:, 0], v[:, 1], nxt[:, 1], inv)

    def contains(self, points: ArrayLike) -> NDArray[np.bool_]:
        """Even-odd rule, (N, 2) -> (N,) bool, one (N, edges) array pass; NaN points are outside.

        Half-open on y, so a point on an edge shared by two zones lands in exactly one of them.
        """
        p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
        x = p[:, :1]
        y = p[:, 1:]
        straddle = (self._y1 > y) != (self._y2 > y)
        x_cross = self._x1 + (y - self._y1) * self._inv_slope
        return ((straddle & (x < x_cross)).sum(axis=1) & 1).astype(bool)

    @property
    def area(self) -> float:
        x, y = self.vertices[:, 0], self.vertices[:, 1]
        return float(0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def points_in_polygon(points: ArrayLike, vertices: ArrayLike) -> NDArray[np.bool_]:
    """Convenience form of ``Polygon.of(vertices).contains(points)``."""
    return Polygon.of(vertices).contains(points)


def _orient(a: Sequence[float], b: Sequence[float], c: Sequence[float]) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


def segments_intersect(
    a: Sequence[float], b: Sequence[float], c: Sequence[float], d: Sequence[float]
) -> bool:
    """Closed segments ab and cd share at least one point (touching and collinear overlap count)."""
    o1, o2, o3, o4 = _orient(a, b, c), _orient(a, b, d), _orient(c, d, a), _orient(c, d, b)
    if ((o1 > 0 and o2 < 0) or (o1 < 0 and o2 > 0)) and ((o3 > 0 and o4 < 0) or (o3 < 0 and o4 > 0)):
        return True

    def on(p: Sequence[float], q: Sequence[float], r: Sequence[float]) -> bool:
        return min(p[0], q[0]) <= r[0] <= max(p[0], q[0]) and min(p[1], q[1]) <= r[1] <= max(p[1], q[1])

    return (
        (o1 == 0 and on(a, b, c)) or (o2 == 0 and on(a, b, d)) or (o3 == 0 and on(c, d, a)) or (o4 == 0 and on(c, d, b))
    )


def check_simple_polygon(vertices: ArrayLike, what: str = "polygon") -> None:
    """Raise ValueError unless the polygon has >= 3 vertices, an area and no self-intersection.

    A bow-tie is almost always two vertices typed in the wrong order; the even-odd rule would
    silently leave its middle out, so we refuse it at config time instead.
    """
    poly = Polygon.of(vertices)
    v = [tuple(p) for p in poly.vertices.tolist()]
    n = len(v)
    for i in range(n):
        for j in range(i + 1, n):
            if j == i + 1 or (i == 0 and j == n - 1):
                continue  # neighbours share a vertex by construction
            if segments_intersect(v[i], v[(i + 1) % n], v[j], v[(j + 1) % n]):
                raise ValueError(f"{what} intersects itself (edges {i} and {j}): check the vertex order")
    if poly.area <= 1e-12:
        raise ValueError(f"{what} has no area")
