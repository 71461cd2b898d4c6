"""A Python task: prints to stdout and stderr; a non-zero exit makes the run FAILED."""
import os
import sys

print(f"report for fire {os.environ['CLOUDTASK_SCHEDULED_AT']}")
print("a warning on stderr", file=sys.stderr)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
