"""Runs the unmodified Eclipse Paho client_test.py (paho/, see paho/README.md) against a broker.

Usage: python3 run-paho.py HOST PORT

client_test.py reads --hostname/--port with getopt and then calls unittest.main(), which parses
the same command line again and stops at the options it does not know; upstream only ever runs
against localhost:1883. This runner gives the suite its options and unittest an empty command
line, so the suite's file stays as upstream wrote it. Standard library only.

Prints one line `PAHO_RESULTS {json}`: {"tests": {name: "ok" | "fail" | "error"}}; exit 0 when
every test passed.
"""

import json
import os
import runpy
import sys
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "paho", "client_test.py")

outcomes = {}


class RecordingResult(unittest.TextTestResult):
    def addSuccess(self, test):
        super().addSuccess(test)
        outcomes[test._testMethodName] = "ok"

    def addFailure(self, test, err):
        super().addFailure(test, err)
        outcomes[test._testMethodName] = "fail"

    def addError(self, test, err):
        super().addError(test, err)
        outcomes[getattr(test, "_testMethodName", str(test))] = "error"


def run_tests():
    # Called by client_test.py's own `unittest.main()`; the module is the suite's __main__.
    runner = unittest.TextTestRunner(verbosity=2, resultclass=RecordingResult)
    unittest.TestProgram(module="__main__", argv=[SUITE], testRunner=runner, exit=False)


def main():
    host, port = sys.argv[1], sys.argv[2]
    sys.path.insert(0, os.path.dirname(SUITE))
    sys.argv = [SUITE, "--hostname", host, "--port", port]
    unittest.main = run_tests
    runpy.run_path(SUITE, run_name="__main__")
    sys.stdout.flush()
    print("PAHO_RESULTS " + json.dumps({"tests": outcomes}), flush=True)
    passed = len(outcomes) > 0 and all(v == "ok" for v in outcomes.values())
    sys.exit(0 if passed else 1)


if __name__ == "__main__":
    main()
