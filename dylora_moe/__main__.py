"""``python -m dylora_moe ...`` is the ``dylora`` command, for launchers that start a module:
``torchrun --nproc_per_node 2 -m dylora_moe train ...``, ``accelerate launch -m dylora_moe train ...``."""

import sys

from dylora_moe.cli import main

if __name__ == "__main__":
    sys.exit(main())
