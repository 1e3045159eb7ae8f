"""`python -m vlens.toy train|eval|samples [options]` is `vlens toy ...`."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["toy", *sys.argv[1:]]))
