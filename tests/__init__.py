"""The test suite: ``tests.support`` holds its helpers; ``scenarios/`` the scripts some tests run in subprocesses."""
