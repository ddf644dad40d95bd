"""`skin-offline bench`: machine facts (machine.py), timed requests (run.py), reports (report.py)."""
