"""`python -m cxpmrg_lib ...` runs the `cxpmrg` command (the same parser, the same exit codes)."""
import sys

from cxpmrg_lib.cli import main

if __name__ == "__main__":
    sys.exit(main())
