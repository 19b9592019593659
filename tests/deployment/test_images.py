"""Container images: both Dockerfiles lint clean, and every module their entry points import is
declared (no Docker engine here, so the images are checked by what they are built from)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.helpers import ROOT

DOCKERFILES = [ROOT / "Dockerfile", ROOT / "trainer-image" / "Dockerfile"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_hadolint_is_clean(dockerfile: Path) -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    out = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_images_run_as_non_root_with_the_launchers() -> None:
    operator, trainer = (p.read_text() for p in DOCKERFILES)
    assert "USER 1000" in operator and "USER 1000" in trainer
    assert 'ENTRYPOINT ["kubetune"]' in operator and 'CMD ["operator"]' in operator
    assert 'ENTRYPOINT ["python", "-m", "kubetune_trainer.launch"]' in trainer
    assert "--extra operator" in operator and "--extra trainer" in trainer
    assert "--extra detectron2" in trainer


def test_detectron2_is_pinned_to_one_commit_everywhere() -> None:
    """The extra, the lock and the install hint name the same upstream commit, not a branch."""
    from kubetune_trainer.d2.build import DETECTRON2_COMMIT, INSTALL_HINT

    pinned = re.findall(r"detectron2\.git@([0-9a-f]{40})\b", (ROOT / "pyproject.toml").read_text())
    locked = re.findall(r"detectron2\.git\?rev=([0-9a-f]{40})#", (ROOT / "uv.lock").read_text())
    assert pinned == [DETECTRON2_COMMIT] and set(locked) == {DETECTRON2_COMMIT}
    assert DETECTRON2_COMMIT in INSTALL_HINT


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_closure(extras: set[str]) -> set[str]:
    """Distributions that installing kubetune[extras] brings in, dependencies followed."""
    own = [Requirement(r) for r in metadata.requires("kubetune") or []]

    def wanted(req: Requirement, active: set[str]) -> bool:
        return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in active | {""})

    active = set(extras)
    for req in own:  # an extra may name others (dev = kubetune[trainer,demo,operator])
        if _norm(req.name) == "kubetune" and wanted(req, active):
            active |= set(req.extras)
    todo = [r for r in own if _norm(r.name) != "kubetune" and wanted(r, active)]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        if _norm(req.name) in seen:
            continue
        seen.add(_norm(req.name))
        with contextlib.suppress(metadata.PackageNotFoundError):  # marker-excluded on this platform
            todo += [d for d in map(Requirement, metadata.requires(req.name) or []) if wanted(d, set(req.extras))]
    return seen


def import_with_only(extras: set[str], code: str, tmp: Path) -> set[str]:
    """Import `code` in an isolated interpreter whose path holds only the image's declared
    distributions (links to their installed files) and the project; returns the loaded modules."""
    site = tmp / "site"
    site.mkdir()
    for name in declared_closure(extras):
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # a marker-excluded dependency
        base = Path(dist.locate_file(""))
        for top in {Path(f).parts[0] for f in dist.files or []} - {"..", "__pycache__"}:
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
    paths = [p for p in sys.path if p and "site-packages" not in p and Path(p).exists()]
    paths += [str(site), str(ROOT / "cli"), str(ROOT / "trainer-image"), str(ROOT / "operator")]
    probe = f"import sys\nsys.path[:] = {paths!r}\n{code}\n"
    probe += "import json\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-I", "-S", "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_operator_entrypoint_needs_only_declared_modules_and_no_torch(tmp_path: Path) -> None:
    code = "import kubetune.cli, kubetune_operator.handlers, kubetune_operator.manifests.monitoring"
    modules = import_with_only({"operator"}, code, tmp_path)
    assert "torch" not in modules and "kopf" in modules


def test_trainer_entrypoint_needs_only_declared_modules(tmp_path: Path) -> None:
    code = "import kubetune_trainer.launch, kubetune_trainer.main, kubetune_trainer.promptable.recipe\n"
    code += "import kubetune_trainer.promptable.models.sam2"
    modules = import_with_only({"trainer"}, code + "\nimport sam2.build_sam", tmp_path)
    assert {"torch", "sam2", "boto3", "prometheus_client"} <= modules
