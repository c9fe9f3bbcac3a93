"""``python -m data_pipelines`` = ``flamingo-data``."""

import sys

from data_pipelines.cli import main

sys.exit(main())
