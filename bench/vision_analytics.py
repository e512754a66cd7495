"""Vision analytics (pure part), one core, no I/O: tracked boxes -> zones, dwell, lines, heatmap, buckets.

A perspective camera over a 20 x 15 m floor, 4 zones (one concave), 2 counting lines, 1 ignore mask,
a 0.5 m heatmap grid, 60 s buckets; 20 people per frame walking random paths at 25 fps (pre-generated,
outside the timed path), flushed once per simulated second as the agent would.

* vision_analytics_tracks_per_s: tracked people accounted per second (update + flush); the median of the rounds.
* vision_analytics_frames_per_s: the same as frames (of 20 people) per second.
* vision_analytics_us_per_frame: microseconds per frame of 20 people.

    python bench/vision_analytics.py                # ~10 s
    python bench/vision_analytics.py --seconds 1    # CI size
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import numpy as np
from _common import emit, header, note

from edge_agent.vision.analytics import Track, TrafficAnalytics, TrafficAnalyticsConfig

T0 = 1_767_225_600.0
FPS = 25.0

CONFIG = {
    "camera": "bench-cam",
    "homography": {
        "image": [[80, 700], [1200, 700], [1000, 200], [280, 200]],
        "floor": [[0, 0], [20, 0], [20, 15], [0, 15]],
    },
    "zones": {
        "entrance": [[8, 0], [12, 0], [12, 3], [8, 3]],
        "produce": [[1, 4], [7, 4], [7, 10], [1, 10]],
        "L-aisle": [[13, 4], [19, 4], [19, 6], [15, 6], [15, 14], [13, 14]],
        "checkout": [[2, 12], [10, 12], [10, 14.5], [2, 14.5]],
    },
    "lines": {
        "door": {"a": [8, 1.5], "b": [12, 1.5], "inside": [10, 5]},
        "aisle": {"a": [13, 6], "b": [15, 6], "inside": [14, 10]},
    },
    "ignore_masks": [[[1150, 150], [1280, 150], [1280, 300], [1150, 300]]],
    "min_box_height_px": 20,
    "heatmap": {"origin": [0, 0], "width_m": 20, "height_m": 15, "cell_m": 0.5},
}


def scene(frames: int, people: int, seed: int = 1) -> list[tuple[float, list[Track]]]:
    """Random walkers that bounce off the floor's edges; ids persist, one in 500 frames someone is replaced."""
    cfg = TrafficAnalyticsConfig.model_validate(CONFIG)
    h = cfg.homography.build()
    rng = random.Random(seed)
    pos = np.array([[rng.uniform(0.5, 19.5), rng.uniform(0.5, 14.5)] for _ in range(people)])
    vel = np.array([[rng.uniform(-1, 1), rng.uniform(-1, 1)] for _ in range(people)])
    ids = list(range(1, people + 1))
    next_id = people + 1
    out = []
    for f in range(frames):
        vel += np.array([[rng.gauss(0, 0.05), rng.gauss(0, 0.05)] for _ in range(people)])
        pos += vel / FPS
        for k in range(people):
            for ax, hi in ((0, 20.0), (1, 15.0)):
                if not 0.2 < pos[k, ax] < hi - 0.2:
                    vel[k, ax] = -vel[k, ax]
                    pos[k, ax] = min(max(pos[k, ax], 0.2), hi - 0.2)
            if rng.random() < 1 / 500:
                ids[k] = next_id
                next_id += 1
        feet = h.to_image(pos)
        tall = 160.0 * (0.4 + feet[:, 1] / 700.0)  # nearer the camera, bigger
        tracks = [
            Track(ids[k], (float(u - tall[k] * 0.2), float(v - tall[k]), float(u + tall[k] * 0.2), float(v)), 0.8)
            for k, (u, v) in enumerate(feet)
        ]
        out.append((T0 + f / FPS, tracks))
    return out


def run_once(frames: list[tuple[float, list[Track]]], cfg: TrafficAnalyticsConfig) -> tuple[float, int]:
    an = TrafficAnalytics(cfg)
    n = 0
    t0 = time.perf_counter()
    next_flush = frames[0][0] + 1.0
    for ts, tracks in frames:
        an.update(ts, tracks)
        n += len(tracks)
        if ts >= next_flush:
            an.flush(ts)
            next_flush += 1.0
    an.flush(frames[-1][0] + 3600)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="approximate total wall time of the timed rounds")
    ap.add_argument("--people", type=int, default=20)
    args = ap.parse_args()

    cfg = TrafficAnalyticsConfig.model_validate(CONFIG)
    n_frames = 3000  # two simulated minutes at 25 fps
    frames = scene(n_frames, args.people)
    header("vision_analytics", people_per_frame=args.people, frames=n_frames, fps=FPS,
           zones=len(cfg.zones), lines=len(cfg.lines), heat_cells=cfg.heatmap.cols * cfg.heatmap.rows)

    elapsed, _ = run_once(frames, cfg)  # warm-up, and sizes the rounds
    rounds = max(3, min(15, int(args.seconds / max(elapsed, 1e-3))))
    rates = []
    for _ in range(rounds):
        elapsed, n = run_once(frames, cfg)
        rates.append(n / elapsed)
    per_s = statistics.median(rates)
    emit("vision_analytics_tracks_per_s", per_s)
    emit("vision_analytics_frames_per_s", per_s / args.people)
    emit("vision_analytics_us_per_frame", 1e6 * args.people / per_s)
    note(f"median of {rounds} rounds of {n_frames} frames; a busy machine (see loadavg) lowers every figure")


if __name__ == "__main__":
    main()
