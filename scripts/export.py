#!/usr/bin/env python
"""Same as `lamda-export` (lamda_pipe/tools/export.py)."""
from lamda_pipe.tools.export import main

if __name__ == "__main__":  # spawned worker processes re-import this file
    raise SystemExit(main())
