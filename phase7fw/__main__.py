"""``python -m phase7fw`` (also what ``torchrun ... -m phase7fw`` launches)."""

import sys

from phase7fw.cli import main

sys.exit(main())
