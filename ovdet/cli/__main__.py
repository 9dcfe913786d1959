"""`python -m ovdet.cli`: the same entry point as the `ovdet` command."""

import sys

from ovdet.cli import main

sys.exit(main())
