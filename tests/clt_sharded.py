"""What each torchrun rank runs for tests/test_clt.py: CLTs trained with --parallel features,
and per-layer CLTs with --parallel data."""

import sys
from pathlib import Path

from test_clt import PER_LAYER, sharded_config, sharded_rows

from choicesae.training.loop import train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for sparsifier in ("mutual_choice", "feature_choice", "topk"):
        train(sharded_config(out / sparsifier, sparsifier, parallel="features"), sharded_rows())
    for sparsifier in PER_LAYER:
        cfg = sharded_config(out / f"data-{sparsifier}", sparsifier, per_layer=True)
        train(cfg, sharded_rows())
