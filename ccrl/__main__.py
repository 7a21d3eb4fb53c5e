"""``python -m ccrl`` (and ``accelerate launch -m ccrl run ...``)."""

import sys

from ccrl.cli import main

sys.exit(main())
