"""schemathesis hooks for tests/test_fuzz.py, loaded through SCHEMATHESIS_HOOKS: each call
the run makes is one JSON line in the file $FUZZ_LOG names, so that the test can count the
calls and find every batch the daemon acknowledged."""

import json
import os

import schemathesis


@schemathesis.hook
def after_call(context, case, response):
    acknowledged = response.status_code == 202
    with open(os.environ["FUZZ_LOG"], "a") as log:
        log.write(json.dumps({"operation": f"{case.method} {case.path}", "status": response.status_code,
                              "body": case.body if acknowledged else None}) + "\n")
