"""Generate `config/detectron2_config.json` from the installed detectron2: every default config
key with its type, and the model-zoo configs the trainer can train. The torch-free check that
reads it is `kubetune_trainer.config.detectron2_keys`.

    python -m kubetune_trainer.d2.schema [OUT]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from kubetune_trainer.config.detectron2_keys import ARCHITECTURES, SNAPSHOT, TYPE_NAMES


def generate() -> dict[str, Any]:
    """Read the installed detectron2: every default key with its type, and the usable zoo configs."""
    import detectron2
    from detectron2 import model_zoo
    from detectron2.config import CfgNode, get_cfg

    def walk(node: CfgNode, prefix: str = "") -> dict[str, str]:
        out = {}
        for key, value in sorted(node.items()):
            if isinstance(value, CfgNode):
                out.update(walk(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = TYPE_NAMES.get(type(value), type(value).__name__)
        return out

    root = Path(detectron2.__file__).parent / "model_zoo" / "configs"
    zoo = {}
    for path in sorted(root.rglob("*.yaml")):
        name = path.relative_to(root).as_posix()
        if path.name.startswith("Base-") or name.startswith(("quick_schedules/", "common/")):
            continue
        cfg = get_cfg()
        cfg.merge_from_file(model_zoo.get_config_file(name))
        m = cfg.MODEL
        if m.META_ARCHITECTURE in ARCHITECTURES and not (m.KEYPOINT_ON or m.LOAD_PROPOSALS):
            zoo[name] = {"masks": bool(m.MASK_ON)}
    return {"detectron2": detectron2.__version__, "keys": walk(get_cfg()), "model_zoo": zoo}


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else SNAPSHOT
    out.write_text(json.dumps(generate(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out}")
