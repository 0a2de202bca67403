#!/usr/bin/env python
"""Writes the demo dialog corpus (lamda_pipe/data/dialog_demo.py) as a dialog file."""
from lamda_pipe.data.dialog_demo import main

if __name__ == "__main__":
    raise SystemExit(main())
