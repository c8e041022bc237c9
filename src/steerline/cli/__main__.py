"""`python -m steerline.cli` is the `steerline` command."""

import sys

from steerline.cli import main

sys.exit(main())
