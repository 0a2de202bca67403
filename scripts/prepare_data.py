#!/usr/bin/env python
"""Same as `lamda-prepare-data` (lamda_pipe/tools/prepare_data.py)."""
from lamda_pipe.tools.prepare_data import main

raise SystemExit(main())
