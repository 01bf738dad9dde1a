"""`python -m mapnet_experiments.cli …` (what torchrun launches): the `mapnet` command."""

import sys

from mapnet_experiments.cli.main import main

sys.exit(main())
