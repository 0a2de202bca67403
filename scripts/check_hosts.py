#!/usr/bin/env python
"""Same as `lamda-check-hosts` (lamda_pipe/tools/check_hosts.py)."""
from lamda_pipe.tools.check_hosts import main

if __name__ == "__main__":
    raise SystemExit(main())
