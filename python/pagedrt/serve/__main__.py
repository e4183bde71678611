"""python -m pagedrt.serve: the same as pagedrt-serve."""
import sys

from .cli import main

sys.exit(main())
