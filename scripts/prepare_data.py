#!/usr/bin/env python
"""Same as `lamda-prepare-data` (lamda_pipe/tools/prepare_data.py)."""
from lamda_pipe.tools.prepare_data import main

if __name__ == "__main__":  # spawned worker processes re-import this file
    raise SystemExit(main())
