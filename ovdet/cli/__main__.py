import sys

from ovdet.cli import main

sys.exit(main())
