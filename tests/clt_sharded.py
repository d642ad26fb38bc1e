"""What each torchrun rank runs for tests/test_clt.py: a CLT trained with --parallel features."""

import sys
from pathlib import Path

from test_clt import sharded_config, sharded_rows

from choicesae.training.loop import train

if __name__ == "__main__":
    out = Path(sys.argv[1])
    for sparsifier in ("mutual_choice", "feature_choice", "topk"):
        train(sharded_config(out / sparsifier, sparsifier, parallel="features"), sharded_rows())
