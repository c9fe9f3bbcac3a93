"""``python -m eval_fewshot`` = ``flamingo-eval``."""

import sys

from eval_fewshot.cli import main

sys.exit(main())
