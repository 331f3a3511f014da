"""`python -m imagestream` runs the CLI."""

import sys

from imagestream.cli import main

if __name__ == "__main__":
    sys.exit(main())
