"""``python -m rlclip`` (and ``accelerate launch -m rlclip``) is the ``rlclip`` command."""

import sys

from rlclip.cli import main

sys.exit(main())
