"""`python -m ladder_kernels` = the `ladder-kernels` command."""

import sys

from ladder_kernels.cli import main

sys.exit(main())
