#!/bin/sh
# A shell task: runs in its unpacked package folder with the run's identity in the env.
set -eu
echo "run $CLOUDTASK_RUN_ID of task $CLOUDTASK_TASK_ID, fire $CLOUDTASK_SCHEDULED_AT (attempt $CLOUDTASK_ATTEMPT)"
echo "files here: $(ls | tr '\n' ' ')"
echo "greeting from the task's env: ${GREETING:-none}"
