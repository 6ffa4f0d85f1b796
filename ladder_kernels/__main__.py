"""`python -m ladder_kernels` = the `ladder-kernels` command."""
import sys

from .cli import main

sys.exit(main())
