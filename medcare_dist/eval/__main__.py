"""`python -m medcare_dist.eval`: the benchmark evaluator's command line (also `medcare-eval`)."""
import sys

from medcare_dist.eval.harness import main

sys.exit(main())
