"""`python -m vlens.toy train|eval|samples [options]`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
