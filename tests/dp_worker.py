"""One process of a data-parallel test launch: ``torchrun --nproc-per-node N tests/dp_worker.py
CONFIGS.json`` trains each config of the JSON list in turn (``dynamics.train`` reads the world from
the launcher's environment), so one launch covers every method (each launch costs the imports)."""

import json
import sys

import dynamics

if __name__ == "__main__":
    for settings in json.loads(open(sys.argv[1]).read()):
        dynamics.train(settings)
