"""`python -m vlens ...` is the `vlens` command (and `torchrun ... -m vlens harvest ...`)."""

import sys

from .cli import main

sys.exit(main())
