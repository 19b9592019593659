"""Fill the GPU kit's bundle (run by `bench/gpu/prepare.sh`): wheels of exactly what the trainer,
the benches and the local S3 server need that the GPU machine's image lacks, plus, when given, a
Detectron2 source to build there with CUDA.

The GPU machine has no network and takes the repository and the bundle together only up to
64 MiB, so the bundle is exact rather than generous: uv.lock's dependency graph is walked from
kubetune's own dependencies and its trainer, demo and detectron2 extras, for CPython 3.12 on
x86-64 Linux, and the walk stops at what the image already has (`present.txt`). Each wheel is the
lock's own file, checked against the lock's sha256. What the lock has only as an sdist (sam2,
iopath, fvcore, antlr4) is built here into a pure-Python wheel, sam2 without its optional CUDA
extension (SAM2_BUILD_CUDA=0, as pyproject.toml builds it). The manifest is written last, and
only when the whole bundle is under the cap; `run.sh` refuses a bundle without one.

    .venv/bin/python bench/gpu/bundle.py --out .gpu [--detectron2-src DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from packaging.markers import Marker
from packaging.tags import Tag, compatible_tags, cpython_tags
from packaging.utils import parse_wheel_filename

ROOT = Path(__file__).resolve().parents[2]
PRESENT = Path(__file__).with_name("present.txt")
EXTRAS = ("trainer", "demo", "detectron2")
# Carried although the image has it: detectron2 imports pkg_resources, which setuptools >= 81 no
# longer ships; the lock pins setuptools < 81 for it.
ALWAYS = {"setuptools"}
# Not wheels: kubetune itself travels as the repository, detectron2 as a source to build there.
NOT_WHEELS = {"kubetune", "detectron2"}
# The GPU machine: CPython 3.12 on a glibc >= 2.28 x86-64 Linux.
MANYLINUX = [f"manylinux_2_{minor}_x86_64" for minor in range(28, 4, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
    "linux_x86_64",
]
D2_SKIP = {".git", "build", "dist", "docs", "__pycache__"}


@dataclass(frozen=True)
class Locked:
    """One package of uv.lock and how it reaches the bundle."""

    name: str
    version: str
    url: str
    sha256: str
    size: int | None
    built: bool  # True: an sdist built here into a wheel


def marker_env(python: str) -> dict[str, str]:
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "extra": "",
    }


def target_tags(python: str) -> list[Tag]:
    """Wheel tags the GPU machine's interpreter accepts, most specific first."""
    version = tuple(int(p) for p in python.split("."))
    return [*cpython_tags(version, platforms=MANYLINUX), *compatible_tags(version, platforms=MANYLINUX)]


def read_present(path: Path = PRESENT) -> set[str]:
    lines = (line.strip() for line in path.read_text().splitlines())
    return {line.lower() for line in lines if line and not line.startswith("#")}


def carried_packages(lock: dict, present: set[str], python: str) -> list[dict]:
    """The lock's packages the bundle must hold: the closure of kubetune's dependencies and
    extras for `python`, stopping at what the image has."""
    env = marker_env(python)
    by_name: dict[str, list[dict]] = {}
    for package in lock["package"]:
        by_name.setdefault(package["name"], []).append(package)

    def resolve(dep: dict) -> dict:
        candidates = by_name[dep["name"]]
        return next(p for p in candidates if p["version"] == dep["version"]) if "version" in dep else candidates[0]

    def edges(package: dict, extras: tuple[str, ...]) -> list[dict]:
        deps = list(package.get("dependencies", []))
        for extra in extras:
            deps += package.get("optional-dependencies", {}).get(extra, [])
        return [d for d in deps if "marker" not in d or Marker(d["marker"]).evaluate(env)]

    (project,) = by_name["kubetune"]
    todo = [(d, tuple(d.get("extra", ()))) for d in edges(project, EXTRAS)]
    seen: set[tuple[str, tuple[str, ...]]] = set()
    chosen: dict[str, dict] = {}
    while todo:
        dep, extras = todo.pop()
        name = dep["name"]
        if (name in present and name not in ALWAYS) or (name, extras) in seen:
            continue
        seen.add((name, extras))
        package = resolve(dep)
        if name not in NOT_WHEELS:  # detectron2's own dependencies travel as wheels
            chosen[name] = package
        todo += [(d, tuple(d.get("extra", ()))) for d in edges(package, extras)]
    return [chosen[name] for name in sorted(chosen)]


def artifact(package: dict, tags: list[Tag]) -> Locked:
    """The best wheel of `package` for the target, or its sdist when it has none that fits."""
    rank = {tag: i for i, tag in enumerate(tags)}
    best = None
    for wheel in package.get("wheels", []):
        filename = wheel["url"].rsplit("/", 1)[1]
        score = min((rank[t] for t in parse_wheel_filename(filename)[3] if t in rank), default=None)
        if score is not None and (best is None or score < best[0]):
            best = (score, wheel)
    if best is not None:
        wheel = best[1]
        return Locked(package["name"], package["version"], wheel["url"], wheel["hash"], wheel.get("size"), False)
    sdist = package.get("sdist")
    if sdist is None:
        raise SystemExit(
            f"{package['name']} {package['version']}: uv.lock has no wheel for the GPU machine and no sdist"
        )
    return Locked(package["name"], package["version"], sdist["url"], sdist["hash"], sdist.get("size"), True)


def sha256(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def download(item: Locked, folder: Path) -> Path:
    """The lock's file, verified against the lock's hash (kept when already there and intact)."""
    path = folder / item.url.rsplit("/", 1)[1]
    expected = item.sha256.removeprefix("sha256:")
    if path.is_file() and sha256(path) == expected:
        return path
    partial = path.with_name(path.name + ".partial")
    with urllib.request.urlopen(item.url, timeout=120) as response, partial.open("wb") as fh:
        shutil.copyfileobj(response, fh)
    if sha256(partial) != expected:
        partial.unlink()
        raise SystemExit(f"{item.url}: sha256 differs from uv.lock's")
    partial.rename(path)
    return path


def build_wheel(item: Locked, sdist: Path, wheels: Path) -> Path:
    """A pure-Python wheel from the lock's sdist, built against this environment (sam2's build
    imports torch) without sam2's CUDA extension."""
    uv = os.environ.get("UV", "uv").split()
    with tempfile.TemporaryDirectory(prefix="kubetune-bundle-") as tmp:
        env = {**os.environ, "SAM2_BUILD_CUDA": "0"}
        command = [*uv, "build", "--quiet", "--wheel", "--no-build-isolation", "--python", sys.executable]
        subprocess.run([*command, "--out-dir", tmp, str(sdist)], check=True, env=env)
        (built,) = Path(tmp).glob("*.whl")
        if not built.name.endswith("-none-any.whl"):
            raise SystemExit(f"{built.name}: built from {item.name}'s sdist but not pure Python; it cannot travel")
        return Path(shutil.copy2(built, wheels / built.name))


def pinned_detectron2(lock: dict) -> str:
    """The commit uv.lock (from pyproject's detectron2 extra) pins."""
    (package,) = [p for p in lock["package"] if p["name"] == "detectron2"]
    return package["source"]["git"].rsplit("#", 1)[1]


def bundle_detectron2(src: Path, commit: str, dest: Path) -> dict:
    """The user's checkout of the pinned commit as one tar.gz, without its git data, docs and
    build products."""
    if not (src / "setup.py").is_file() or not (src / "detectron2" / "__init__.py").is_file():
        raise SystemExit(f"--detectron2-src {src}: not a detectron2 source tree (no setup.py, detectron2/)")
    head = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    at = head.stdout.strip() if head.returncode == 0 and (src / ".git").exists() else None
    if at is not None and at != commit:
        raise SystemExit(f"--detectron2-src {src} is at {at}; pyproject.toml pins {commit}")
    if at is None:
        print(f"note: {src} is not a git checkout; it is taken to be detectron2 at {commit}", file=sys.stderr)

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        parts = Path(info.name).parts
        if D2_SKIP & set(parts) or info.name.endswith((".so", ".egg-info")) or ".egg-info" in info.name:
            return None
        if info.issym():  # setup.py's own link detectron2/model_zoo/configs -> configs, remade there
            return None
        return info

    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src, arcname="detectron2", filter=keep)
    return {"commit": commit, "verified_commit": at is not None, "file": dest.name, "bytes": dest.stat().st_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / ".gpu")
    parser.add_argument("--detectron2-src", type=Path, default=None, help="a checkout of the pinned commit")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's CPython (major.minor)")
    parser.add_argument("--cap-mib", type=float, default=56.0, help="refuse to finish above this size")
    args = parser.parse_args()

    lock_bytes = (ROOT / "uv.lock").read_bytes()
    lock = tomllib.loads(lock_bytes.decode())
    wheels = args.out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    manifest = args.out / "manifest.json"
    manifest.unlink(missing_ok=True)  # a bundle counts only once it is complete and under the cap

    tags = target_tags(args.python_version)
    entries = []
    with tempfile.TemporaryDirectory(prefix="kubetune-sdists-") as sdists:
        for package in carried_packages(lock, read_present(), args.python_version):
            item = artifact(package, tags)
            path = download(item, Path(sdists) if item.built else wheels)
            if item.built:
                path = build_wheel(item, path, wheels)
            origin = "built from the lock's sdist" if item.built else "the lock's wheel"
            entries.append({"name": item.name, "version": item.version, "file": path.name, "from": origin})
            entries[-1]["bytes"] = path.stat().st_size
    for stale in set(wheels.iterdir()) - {wheels / e["file"] for e in entries}:
        stale.unlink()

    d2_tar = args.out / "detectron2-src.tar.gz"
    detectron2 = None
    if args.detectron2_src:
        detectron2 = bundle_detectron2(args.detectron2_src.resolve(), pinned_detectron2(lock), d2_tar)
    else:
        d2_tar.unlink(missing_ok=True)

    for entry in entries:
        print(f"{entry['bytes'] / 2**20:8.2f} MiB  {entry['file']}  ({entry['from']})")
    if detectron2:
        print(f"{detectron2['bytes'] / 2**20:8.2f} MiB  {d2_tar.name}  (detectron2 at {detectron2['commit'][:12]})")
    others = [p for p in args.out.rglob("*") if p.is_file() and p.parent != wheels and p != d2_tar]
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{total / 2**20:8.2f} MiB  in all under {args.out} ({len(entries)} wheels)")
    if others:
        print("also there (counted): " + ", ".join(str(p.relative_to(args.out)) for p in others))
    if total > args.cap_mib * 2**20:
        raise SystemExit(f"refusing: the bundle is {total / 2**20:.1f} MiB, over the {args.cap_mib:g} MiB cap")
    record = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python_version": args.python_version,
        "uv_lock_sha256": hashlib.sha256(lock_bytes).hexdigest(),
        "wheels": entries,
        "detectron2": detectron2,
        "total_bytes": total,
    }
    manifest.write_text(json.dumps(record, indent=1) + "\n")
    print(f"bundle ready: {manifest}")


if __name__ == "__main__":
    main()
