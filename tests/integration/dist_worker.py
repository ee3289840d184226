"""Launched by torchrun from test_models_distributed.py: trains every run of a JSON spec in this
process group (one launch for all model kinds, so the test pays torchrun's start-up once).

Each run: ``{"recipe": PATH, "overrides": {...}}``; the engine is the same as ``phase7fw run``'s.
"""

import json
import sys

from phase7fw.core.distributed import shutdown
from phase7fw.core.engine import Engine
from phase7fw.plugins import load_plugins


def main(spec_path: str) -> None:
    plugins = load_plugins()
    done = False
    try:
        for run in json.loads(open(spec_path).read()):
            Engine.from_recipe(run["recipe"], run["overrides"], dummy_data=True, resume="never", plugins=plugins,
                               quiet=True).fit()
        done = True
    finally:
        shutdown(wait_for_peers=done)


if __name__ == "__main__":
    main(sys.argv[1])
