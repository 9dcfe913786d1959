#!/usr/bin/env python
"""Standalone live detection: `python scripts/webcam.py --classes "cup,phone"` (same options as `ovdet webcam`)."""

import sys

from ovdet.cli import main

if __name__ == "__main__":
    sys.exit(main(["webcam", *sys.argv[1:]]))
