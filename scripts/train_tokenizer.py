#!/usr/bin/env python
"""Same as `lamda-train-tokenizer` (lamda_pipe/tools/train_tokenizer.py)."""
from lamda_pipe.tools.train_tokenizer import main

if __name__ == "__main__":  # spawned worker processes re-import this file
    raise SystemExit(main())
