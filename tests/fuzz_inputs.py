"""Driver of test_integrity's fuzz test: runs the training CLI in this one process on each damaged input.

    python tests/fuzz_inputs.py CASES.json  ->  prints one JSON line per case: {name, exit, stderr, traceback}

In-process (one interpreter start for every case) because each case stops before any training.
"""

import contextlib
import io
import json
import sys
import traceback


def main(path):
    from medcare_dist.cli import main as cli_main

    for case in json.loads(open(path).read()):
        err = io.StringIO()
        code, tb = None, None
        with contextlib.redirect_stderr(err):
            try:
                cli_main(case["argv"])
                code = 0
            except SystemExit as e:
                code = e.code
            except BaseException:  # what the CLI let through: a traceback a user would see
                tb = traceback.format_exc()
                code = 1
        print(json.dumps({"name": case["name"], "exit": code, "stderr": err.getvalue()[-3000:], "traceback": tb}),
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
