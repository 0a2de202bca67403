#!/usr/bin/env python
"""Same as `lamda-eval-dialog` (lamda_pipe/tools/eval_dialog.py)."""
from lamda_pipe.tools.eval_dialog import main

if __name__ == "__main__":
    raise SystemExit(main())
