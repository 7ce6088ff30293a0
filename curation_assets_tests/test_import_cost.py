"""Loading the Definitions stays cheap: no heavy library is imported with them (issue 12).

Every Dagster run process, step process, code server and sensor evaluation imports
``curation_assets.definitions``; torch, faiss, matplotlib and the like belong inside the asset
bodies and core functions that use them. The import runs in a fresh interpreter, because
this test process has long since imported all of them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "torchvision", "open_clip", "faiss", "timm", "matplotlib", "skimage", "scipy")

# Runs in the child. A meta-path finder that finds nothing, so the normal finders still import
# everything, notes the chain of executing modules (and curation_assets functions) at the first
# lookup of each heavy package: the failure message then says which import to move.
_PROBE = r"""
import json
import sys

heavy = set(sys.argv[1].split(","))
chains = {}


class ChainRecorder:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in heavy and top not in chains:
            chain, frame = [], sys._getframe(1)
            while frame is not None:
                module = frame.f_globals.get("__name__", "?")
                if frame.f_code.co_name == "<module>":
                    chain.append(module)
                elif module.startswith("curation_assets"):
                    chain.append(f"{module}.{frame.f_code.co_name}()")
                frame = frame.f_back
            chains[top] = " -> ".join([*reversed(chain), name])
        return None


sys.meta_path.insert(0, ChainRecorder())
import curation_assets.definitions  # noqa: E402

print(json.dumps({top: chains.get(top, "?") for top in sorted(heavy) if top in sys.modules}))
"""


def test_loading_the_definitions_imports_no_heavy_library():
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, ",".join(HEAVY)],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"importing curation_assets.definitions failed:\n{done.stderr[-4000:]}"
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    assert not imported, "importing curation_assets.definitions imported heavy libraries:\n" + "\n".join(
        f"  {top}: {chain}" for top, chain in imported.items()
    )
