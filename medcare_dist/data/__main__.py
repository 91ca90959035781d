"""`python -m medcare_dist.data check FILE ...`: validate training data files before a run."""
import sys

from medcare_dist.data.conversations import main

sys.exit(main())
