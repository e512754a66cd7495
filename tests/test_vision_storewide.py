"""Store-wide ("*") traffic: the cameras' buckets merged (pure), and the vision service's wiring of it."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.clock import RealClock, rfc3339
from edge_agent.config import VisionConfig
from edge_agent.contract import TrafficHeatmapItem, TrafficStatsItem
from edge_agent.sync.compaction import stats_key
from edge_agent.sync.outbox import Outbox
from edge_agent.vision.analytics import Track, TrafficAnalytics, TrafficAnalyticsConfig, Visit
from edge_agent.vision.service import VisionService
from edge_agent.vision.storewide import STORE_WIDE, DwellCarry, StoreWideTraffic

T0 = 1_767_225_600.0  # a multiple of 60
EDGES = [10.0, 30.0, 60.0]
GRID = {"origin": [0, 0], "width_m": 10, "height_m": 10, "cell_m": 5.0}  # 2x2 cells


def camera(name: str, **over: Any) -> dict[str, Any]:
    """A camera looking straight down at a 10 m x 10 m floor (100 px a metre), a shelf zone and a door line."""
    return {
        "camera": name,
        "homography": {"image": [[0, 0], [1000, 0], [1000, 1000], [0, 1000]],
                       "floor": [[0, 0], [10, 0], [10, 10], [0, 10]]},
        "zones": {"shelf": [[1, 1], [4, 1], [4, 4], [1, 4]]},
        "lines": {"door": {"a": [6, 5], "b": [9, 5], "inside": [7.5, 2]}},
        "heatmap": GRID,
        "dwell_edges_s": EDGES,
        **over,
    }


def cams(*cfgs: dict[str, Any]) -> list[TrafficAnalyticsConfig]:
    return [TrafficAnalyticsConfig.model_validate(c) for c in cfgs]


def stat(cam: str, minute: int, zone: str | None = None, *, bucket_s: int = 60, **v: Any) -> dict[str, Any]:
    item = {"camera": cam, "zone": zone, "bucket_start": rfc3339(T0 + 60 * minute), "bucket_s": bucket_s,
            "entries": 0, "exits": 0, "occupancy_min": 0.0, "occupancy_avg": 0.0, "occupancy_max": 0.0, "visits": 0,
            "dwell_edges_s": [] if zone is None else EDGES, "dwell_hist": [] if zone is None else [0, 0, 0, 0],
            "dwell_median_s": None}
    return item | v


def heat(cam: str, minute: int, cells: list[float]) -> dict[str, Any]:
    return {"camera": cam, "bucket_start": rfc3339(T0 + 60 * minute), "bucket_s": 60, "cell_m": 5.0, "cols": 2,
            "rows": 2, "cells": cells}


def wide(items: list[dict[str, Any]], zone: str | None = None) -> list[dict[str, Any]]:
    return [i for i in items if i["camera"] == STORE_WIDE and i["zone"] == zone]


# ---------------------------------------------------------------- when a store-wide bucket goes out


def test_waits_for_every_camera_then_merges() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b")), wait_s=60)
    a = [stat("a", 0, entries=3, exits=1, occupancy_min=1, occupancy_avg=2.5, occupancy_max=4),
         stat("a", 0, "shelf", visits=2, occupancy_avg=0.5, occupancy_max=1, dwell_hist=[1, 1, 0, 0],
              dwell_median_s=15.0)]
    assert sw.add("a", a, [heat("a", 0, [1, 2, 3, 4])], {}, now=0) == ([], [])
    b = [stat("b", 0, entries=2, exits=2, occupancy_min=1, occupancy_avg=1.25, occupancy_max=3)]
    stats, hm = sw.add("b", b, [heat("b", 0, [0.5, 0, 0, 1])], {}, now=1)
    [whole] = wide(stats)
    assert (whole["entries"], whole["exits"]) == (5, 3)
    # avg adds exactly; min and max are the envelope (sums), so min <= avg <= max always holds
    assert (whole["occupancy_min"], whole["occupancy_avg"], whole["occupancy_max"]) == (2, 3.75, 7)
    [shelf] = wide(stats, "shelf")  # only camera a has the zone: its figures, its exact median
    assert (shelf["visits"], shelf["dwell_hist"], shelf["dwell_median_s"]) == (2, [1, 1, 0, 0], 15.0)
    assert [h["cells"] for h in hm] == [[1.5, 2, 3, 5]] and hm[0]["camera"] == STORE_WIDE
    for it in stats:
        TrafficStatsItem.model_validate(it)
    TrafficHeatmapItem.model_validate(hm[0])
    assert sw.counters["buckets"] == 1 and sw.counters["partial_buckets"] == 0


def test_zones_of_one_name_on_several_cameras_are_one_store_zone() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b")), wait_s=60)
    sw.add("a", [stat("a", 0), stat("a", 0, "shelf", visits=1, occupancy_max=1, dwell_hist=[0, 1, 0, 0])],
           [], {rfc3339(T0): {"shelf": [12.0]}}, now=0)
    stats, _ = sw.add("b", [stat("b", 0), stat("b", 0, "shelf", visits=2, occupancy_max=2, dwell_hist=[1, 0, 1, 0])],
                      [], {rfc3339(T0): {"shelf": [4.0, 40.0]}}, now=0)
    [shelf] = wide(stats, "shelf")
    assert (shelf["visits"], shelf["occupancy_max"], shelf["dwell_hist"]) == (3, 3, [1, 1, 1, 0])
    assert shelf["dwell_median_s"] == 12.0  # exact: the median of 4, 12 and 40 s, not a bin's middle
    assert sw.counters["approx_medians"] == 0


def test_a_camera_that_moved_on_had_nothing_in_the_bucket() -> None:
    # Cameras flush buckets in order: b delivering minute 1 means it had no frames in minute 0.
    sw = StoreWideTraffic(cams(camera("a"), camera("b")), wait_s=60)
    sw.add("a", [stat("a", 0, entries=1)], [], {}, now=0)
    stats, _ = sw.add("b", [stat("b", 1, entries=5)], [], {}, now=0)
    assert [(s["bucket_start"], s["entries"]) for s in wide(stats)] == [(rfc3339(T0), 1)]
    assert sw.counters["partial_buckets"] == 1  # b is not in it: it saw nothing that minute


def test_a_silent_camera_holds_the_bucket_only_until_the_deadline_and_is_late_after() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b")), wait_s=30)
    sw.add("a", [stat("a", 0, entries=1)], [heat("a", 0, [1, 1, 1, 1])], {}, now=100)
    assert sw.due(129.9) == ([], [])
    stats, hm = sw.due(130)
    assert [s["entries"] for s in wide(stats)] == [1] and len(hm) == 1
    assert sw.counters["partial_buckets"] == 1
    # b comes back with the old minute: its own items still go out (the service enqueues them), but the
    # store-wide minute is out already, and a second "*" item would be summed with the first by coarsening.
    assert sw.add("b", [stat("b", 0, entries=7)], [heat("b", 0, [1, 1, 1, 1])], {}, now=140) == ([], [])
    assert sw.counters["late_items"] == 2
    assert sw.flush() == ([], [])


def test_a_finished_camera_is_not_waited_for() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b")), wait_s=3600)
    sw.add("a", [stat("a", 5, entries=2)], [], {}, now=0)
    stats, _ = sw.camera_done("b")
    assert [s["entries"] for s in wide(stats)] == [2]


def test_flush_sends_what_is_waiting() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b")), wait_s=3600)
    sw.add("a", [stat("a", 0, entries=1)], [], {}, now=0)
    sw.add("a", [stat("a", 1, entries=2)], [], {}, now=0)
    stats, _ = sw.flush()
    assert [s["entries"] for s in wide(stats)] == [1, 2]
    assert sw.flush() == ([], [])


def test_cameras_with_another_bucket_length_are_not_waited_for() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b", bucket_s=10)), wait_s=3600)
    stats, _ = sw.add("a", [stat("a", 0, entries=1)], [], {}, now=0)
    assert [s["bucket_s"] for s in wide(stats)] == [60]
    stats, _ = sw.add("b", [stat("b", 0, bucket_s=10, entries=4)], [], {}, now=0)
    assert [(s["bucket_s"], s["entries"]) for s in wide(stats)] == [(10, 4)]


def test_unknown_camera_is_an_error() -> None:
    with pytest.raises(ValueError, match="not configured"):
        StoreWideTraffic(cams(camera("a")), wait_s=1).add("x", [stat("x", 0)], [], {}, now=0)


# ---------------------------------------------------------------- heatmaps and medians


@pytest.mark.parametrize(
    ("b_over", "merges"),
    [
        ({}, True),
        ({"heatmap": GRID | {"origin": [10, 0]}}, False),  # b's cells are other places of the floor
        ({"heatmap": GRID | {"cell_m": 2.5}}, False),
        ({"heatmap": None}, False),  # a store-wide sum of a's cells alone would not be the store's
    ],
)
def test_heatmaps_merge_only_on_one_shared_grid(b_over: dict[str, Any], merges: bool) -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b", **b_over)), wait_s=60)
    assert sw.merges_heatmaps is merges
    sw.add("a", [stat("a", 0)], [heat("a", 0, [1, 0, 0, 0])], {}, now=0)
    _, hm = sw.add("b", [stat("b", 0)], [heat("b", 0, [0, 1, 0, 0])] if b_over.get("heatmap", 1) else [], {}, now=0)
    assert [h["cells"] for h in hm] == ([[1, 1, 0, 0]] if merges else [])


def test_the_store_wide_heatmap_draws_each_door_once() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b", lines={"door": {"a": [6, 5], "b": [9, 5], "inside": [7.5, 2]},
                                                               "back": {"a": [0, 9], "b": [2, 9], "inside": [1, 8]}})),
                          wait_s=60)
    door = {"name": "door", "a": [6, 5], "b": [9, 5]}
    back = {"name": "back", "a": [0, 9], "b": [2, 9]}
    sw.add("a", [stat("a", 0)], [heat("a", 0, [1, 0, 0, 0]) | {"origin": [0, 0], "doors": [door]}], {}, now=0)
    _, [hm] = sw.add("b", [stat("b", 0)], [heat("b", 0, [0, 1, 0, 0]) | {"origin": [0, 0], "doors": [door, back]}],
                     {}, now=0)
    assert hm["origin"] == [0, 0] and sorted(d["name"] for d in hm["doors"]) == ["back", "door"]


def test_median_falls_back_to_the_histogram_without_the_dwell_seconds() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b")), wait_s=60)
    sw.add("a", [stat("a", 0, "shelf", visits=1, dwell_hist=[0, 1, 0, 0], dwell_median_s=20.0)], [], {}, now=0)
    stats, _ = sw.add("b", [stat("b", 0, "shelf", visits=2, dwell_hist=[0, 1, 1, 0], dwell_median_s=35.0)], [], {},
                      now=0)
    [shelf] = wide(stats, "shelf")
    assert shelf["dwell_median_s"] == 20.0  # the middle of the [10, 30) bin that holds the median visit
    assert sw.counters["approx_medians"] == 1


def test_histograms_with_other_edges_are_not_added() -> None:
    sw = StoreWideTraffic(cams(camera("a"), camera("b", dwell_edges_s=[60.0])), wait_s=60)
    sw.add("a", [stat("a", 0, "shelf", visits=1, dwell_hist=[0, 1, 0, 0])], [], {rfc3339(T0): {"shelf": [20.0]}},
           now=0)
    stats, _ = sw.add("b", [stat("b", 0, "shelf", visits=1, dwell_edges_s=[60.0], dwell_hist=[0, 1])], [],
                      {rfc3339(T0): {"shelf": [80.0]}}, now=0)
    [shelf] = wide(stats, "shelf")
    assert (shelf["dwell_edges_s"], shelf["dwell_hist"], shelf["dwell_median_s"]) == ([], [], 50.0)


def test_dwell_carry_hands_over_the_seconds_of_flushed_buckets_only() -> None:
    carry = DwellCarry(60)
    carry.add([Visit(1, "shelf", T0 + 1, T0 + 20, 19.0), Visit(2, "shelf", T0 + 30, T0 + 59.9, 29.9),
               Visit(3, "till", T0 + 50, T0 + 70, 20.0)])
    assert carry.take([stat("a", 0), stat("a", 0, "shelf", visits=2)]) == {rfc3339(T0): {"shelf": [19.0, 29.9]}}
    assert carry.take([stat("a", 1, "till", visits=1)]) == {rfc3339(T0 + 60): {"till": [20.0]}}
    assert carry.take([stat("a", 2, "till")]) == {}


# ---------------------------------------------------------------- property: any split of events over cameras

FLOOR_PX = 100.0


def _person(tid: int, x: float, y: float) -> Track:
    u, v = x * FLOOR_PX, y * FLOOR_PX
    return Track(tid, (u - 20.0, v - 170.0, u + 20.0, v))


def _camera_messages(cfg: TrafficAnalyticsConfig, events: list[tuple[str, int, int]], end_s: int) -> list[tuple]:
    """What a camera process sends for these events: ("in"/"out", second) crossings, ("stay", second, seconds)
    visits to the shelf; a frame every second, a flush every five, like run_camera."""
    at: dict[int, list[Track]] = {}
    for tid, (kind, t, d) in enumerate(events, start=1):
        if kind == "stay":
            for s in range(t, t + d + 1):
                at.setdefault(s, []).append(_person(tid, 2.5, 2.5))
        else:
            y0, y1 = (6.0, 4.0) if kind == "in" else (4.0, 6.0)
            at.setdefault(t, []).append(_person(tid, 7.5, y0))
            at.setdefault(t + 1, []).append(_person(tid, 7.5, y1))
    an, carry, out = TrafficAnalytics(cfg), DwellCarry(cfg.bucket_s), []

    def flush(until: float) -> None:
        stats, hm = an.flush(until)
        carry.add(an.pop_visits())
        if stats or hm:
            out.append((stats, hm, carry.take(stats)))

    for s in range(end_s + 1):
        an.update(T0 + s, at.get(s, []))
        if s % 5 == 0:
            flush(T0 + s)
    flush(T0 + end_s + cfg.bucket_s + cfg.track_grace_s + 1)
    return out


event = st.one_of(
    st.tuples(st.sampled_from(["in", "out"]), st.integers(0, 290), st.just(0)),
    st.tuples(st.just("stay"), st.integers(0, 200), st.integers(5, 90)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    split=st.lists(st.tuples(event, st.integers(0, 2)), max_size=25),
    order=st.lists(st.integers(0, 2), min_size=60, max_size=60),
)
def test_store_wide_figures_equal_the_sum_over_cameras_for_any_split(
    split: list[tuple[tuple[str, int, int], int]], order: list[int]
) -> None:
    # Stays all happen on one spot, people appearing and vanishing mid-floor: with reattaching on, a person
    # arriving where another just vanished would continue that visit. This test is about merging cameras.
    configs = cams(*(camera(f"c{i}") | {"reattach_speed_mps": 0.0} for i in range(3)))
    per_cam = [_camera_messages(c, [e for e, i in split if i == k], 300) for k, c in enumerate(configs)]
    sw = StoreWideTraffic(configs, wait_s=math.inf)
    wide_stats: list[dict[str, Any]] = []
    cam_stats: list[dict[str, Any]] = []
    # The cameras' messages interleave in any order, each camera's in its own order.
    queues = [list(m) for m in per_cam]
    for k in order + [0, 1, 2] * 20:
        if queues[k]:
            stats, hm, dw = queues[k].pop(0)
            cam_stats += stats
            wide_stats += sw.add(configs[k].camera, stats, hm, dw, now=0)[0]
    for c in configs:
        wide_stats += sw.camera_done(c.camera)[0]
    assert sw.flush() == ([], [])

    def bucket(t: float) -> str:
        return rfc3339(T0 + 60 * math.floor(t / 60))

    keys = [(s["bucket_start"], s["zone"]) for s in wide_stats]
    assert len(keys) == len(set(keys)) == len({(s["bucket_start"], s["zone"]) for s in cam_stats})
    for w in wide_stats:
        TrafficStatsItem.model_validate(w)
        parts = [s for s in cam_stats if (s["bucket_start"], s["zone"]) == (w["bucket_start"], w["zone"])]
        for k in ("entries", "exits", "visits"):
            assert w[k] == sum(p[k] for p in parts)
        assert w["occupancy_min"] <= w["occupancy_avg"] <= w["occupancy_max"]
        assert w["occupancy_avg"] == pytest.approx(sum(p["occupancy_avg"] for p in parts), abs=1e-3)
        if w["zone"] is None:
            # ... and the ground truth: every crossing once, in the minute the person stepped over the line
            crossings = [kd for (kd, t, _), _i in split if kd != "stay" and bucket(t + 1) == w["bucket_start"]]
            assert (w["entries"], w["exits"]) == (crossings.count("in"), crossings.count("out"))
        else:
            dwells = [d for (kd, t, d), _i in split if kd == "stay" and bucket(t + d) == w["bucket_start"]]
            assert w["visits"] == len(dwells)
            assert w["dwell_hist"] == [sum(col) for col in zip(*(p["dwell_hist"] for p in parts), strict=True)]
            assert w["dwell_median_s"] == (statistics.median(dwells) if dwells else None)


# ---------------------------------------------------------------- the vision service's wiring


def _service(tmp_path: Path) -> tuple[VisionService, Outbox]:
    vcfg = VisionConfig.model_validate({"enabled": True, "cameras": [camera("a") | {"url": "a.mp4"},
                                                                       camera("b") | {"url": "b.mp4"}]})
    ob = Outbox(tmp_path / "outbox.db", RealClock())
    return VisionService(vcfg, ob), ob


def _pending(ob: Outbox) -> list[tuple[str, str, dict[str, Any]]]:
    return [(s, k, json.loads(b)) for s, k, b in ob.read("SELECT stream, key, body FROM pending ORDER BY id")]


def test_service_enqueues_store_wide_items_with_the_camera_items_that_complete_them(tmp_path: Path) -> None:
    svc, ob = _service(tmp_path)
    svc._handle(("facts", "a", [stat("a", 0, entries=1)], [heat("a", 0, [1, 0, 0, 0])], {}))
    assert [b["camera"] for _, _, b in _pending(ob)] == ["a", "a"]
    svc._handle(("facts", "b", [stat("b", 0, entries=2)], [heat("b", 0, [0, 1, 0, 0])], {}))
    rows = _pending(ob)
    assert [(s, b["camera"]) for s, _, b in rows[2:]] == [
        ("traffic/stats", "b"), ("traffic/stats", "*"), ("traffic/heatmap", "b"), ("traffic/heatmap", "*")]
    whole = rows[3][2]
    assert whole["entries"] == 3 and rows[3][1] == stats_key(whole) == "*|"
    assert svc.figures["vision.*.buckets"] == 1
    ob.close()


def test_service_flushes_waiting_store_wide_buckets_when_it_stops(tmp_path: Path) -> None:
    svc, ob = _service(tmp_path)
    # What a camera sent just before stop() is still taken, then the bucket b never completed goes out.
    svc._queues["a"].put(("facts", "a", [stat("a", 0, entries=4)], [], {}))
    svc._halt.set()
    svc._drain.start()
    svc._drain.join(10)
    assert [(b["camera"], b["entries"]) for _, _, b in _pending(ob)] == [("a", 4), ("*", 4)]
    assert svc.figures["vision.*.partial_buckets"] == 1
    ob.close()


def test_star_is_not_a_camera_id() -> None:
    with pytest.raises(ValueError, match="reserved"):
        VisionConfig.model_validate({"cameras": [camera("*") | {"url": "x.mp4"}]})
