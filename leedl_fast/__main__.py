"""``python -m leedl_fast ...`` is the ``leedl-fast`` command (and what ``torchrun -m leedl_fast`` runs)."""
import sys

from leedl_fast.cli import main

if __name__ == "__main__":
    sys.exit(main())
