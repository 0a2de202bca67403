#!/usr/bin/env python
"""Same as `lamda-train-tokenizer` (lamda_pipe/tools/train_tokenizer.py)."""
from lamda_pipe.tools.train_tokenizer import main

raise SystemExit(main())
