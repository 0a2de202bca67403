#!/usr/bin/env python
"""Pre-train a LaMDA-style model with DeepSpeed pipeline parallelism.

    deepspeed --num_gpus 2 ds_train.py            # the demo: `debug` preset, bundled corpus, 2 stages
    deepspeed --num_gpus 2 ds_train.py --help     # all flags

See lamda_pipe/train.py for the implementation and README.md for launching on clusters.
"""

from lamda_pipe.train import cli

if __name__ == "__main__":
    cli()
