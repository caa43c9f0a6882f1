#!/usr/bin/env bash
# The standing GPU measurement (bench/campaign.py says what each part measures; --plan lists the parts, their
# boxes and each device call's total). Results in $OUT: campaign.tar.gz, parts.txt, summary.md, device.txt;
# commit the JSON under bench/results/ and the tables in bench/RESULTS.md.
#
# Here, once:  bash bench/gpu_checks.sh --fetch-wheels   (diffusers, FastAPI and friends into .whl/, the native
#                                                        kernel library into .native/)
# Device:      run(command="bash bench/gpu_campaign.sh", carry=[".whl", ".native"], timeout_s=560)      call 1
#              run(command="bash bench/gpu_campaign.sh --call 2", carry=[".whl", ".native"], timeout_s=560)
#              run(command="bash bench/gpu_campaign.sh PART", ...)   a resume: from PART to the end of its call
# Here:        bash bench/gpu_campaign.sh --plan | --rehearse [--all | --call N | PART]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
[[ " $* " == *" --plan "* || " $* " == *" --rehearse "* ]] || source bench/gpu_wheels.sh
exec "${PYTHON:-python3}" bench/campaign.py "$@"
