"""Stage 1 of the GPU kit: what this machine is, and whether everything kubetune runs imports.

Records the GPU, driver, torch/CUDA/cuDNN/NCCL versions, bf16 support, a bf16 matrix product's
TFLOP/s (what the encoder's share of peak is later read against) and the versions of the packages
the bundle carries. Exits 1, after writing its JSON, when a module the later stages need does not
import, so a bundle that lacks something costs seconds instead of a measurement round.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# What stages 2-5 import (stage 6 builds detectron2 itself, so it is only reported).
REQUIRED = [
    "pydantic",
    "structlog",
    "boto3",
    "moto.server",
    "yaml",
    "numpy",
    "PIL.Image",
    "pycocotools.mask",
    "prometheus_client",
    "tqdm",
    "matplotlib",
    "hydra",
    "omegaconf",
    "iopath",
    "sam2.build_sam",
    "monai.losses",
    "safetensors.torch",
    "transformers",
    "torchvision.ops",
    "kubetune.cli",
    "kubetune.s3server",
    "kubetune_operator.specs",
    "kubetune_trainer.promptable.recipe",
    "kubetune_trainer.promptable.models.sam2",
    "kubetune_trainer.promptable.models.sam",
]
OPTIONAL = ["detectron2", "fvcore", "yacs", "cv2", "pkg_resources"]
DISTRIBUTIONS = [
    "torch",
    "torchvision",
    "transformers",
    "huggingface-hub",
    "safetensors",
    "numpy",
    "pillow",
    "sam2",
    "hydra-core",
    "iopath",
    "pycocotools",
    "monai",
    "pydantic",
    "pydantic-core",
    "structlog",
    "boto3",
    "botocore",
    "moto",
    "flask",
    "werkzeug",
    "prometheus-client",
    "setuptools",
    "detectron2",
    "fvcore",
    "opencv-python-headless",
]


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def import_errors(modules: list[str]) -> dict[str, str]:
    errors = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # any failure to import is what this stage reports
            errors[name] = f"{type(exc).__name__}: {exc}"
    return errors


def driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def matmul_tflops(torch) -> float:
    """A large bf16 product, the dense tensor-core ceiling this GPU reaches from PyTorch."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 10
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e12


def gpu_facts(torch) -> dict:
    if not torch.cuda.is_available():
        return {"cuda_available": False}
    props = torch.cuda.get_device_properties(0)
    return {
        "cuda_available": True,
        "name": props.name,
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "capability": f"{props.major}.{props.minor}",
        "bf16_supported": torch.cuda.is_bf16_supported(),
        "driver": driver(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "cudnn": torch.backends.cudnn.version(),
        "matmul_bf16_tflops": round(matmul_tflops(torch), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--expect-gpu", action="store_true", help="fail when no CUDA device is visible")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    import torch

    facts = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "shm_gib": round(shutil.disk_usage("/dev/shm").total / 2**30, 1) if os.path.isdir("/dev/shm") else None,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "gpu": gpu_facts(torch),
        "versions": {dist: version(dist) for dist in DISTRIBUTIONS},
        "import_errors": import_errors(REQUIRED),
        "optional_missing": sorted(import_errors(OPTIONAL)),
    }
    problems = [f"{name} does not import ({error})" for name, error in facts["import_errors"].items()]
    if args.expect_gpu and not facts["gpu"]["cuda_available"]:
        problems.append("no CUDA device is visible")
    facts["problems"] = problems
    args.out.write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts, indent=1))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
