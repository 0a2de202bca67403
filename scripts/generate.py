#!/usr/bin/env python
"""Same as `lamda-generate` (lamda_pipe/tools/generate.py)."""
from lamda_pipe.tools.generate import main

if __name__ == "__main__":  # spawned worker processes re-import this file
    raise SystemExit(main())
