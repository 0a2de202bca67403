#!/usr/bin/env python
"""Same as `lamda-chat` (lamda_pipe/tools/chat.py)."""
from lamda_pipe.tools.chat import main

if __name__ == "__main__":  # spawned worker processes re-import this file
    raise SystemExit(main())
