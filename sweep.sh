#!/usr/bin/env bash
# Train a grid of looped transformers and fit the scaling law to it: the one command to run.
#
#   bash sweep.sh                                  # the grid for this machine: midi on a GPU node,
#                                                  # the CPU demo elsewhere (builds its data, prints
#                                                  # the plan and its cost, trains, fits)
#   bash sweep.sh --dry-run                        # that plan, one line per run, and its cost
#   bash sweep.sh --preset paper --dry-run         # the 116 runs of the paper grid and their cost
#   bash sweep.sh --preset mini --gpus 1           # 0.46 H100-hours measured
#   bash sweep.sh --preset paper --gpus 8          # 8 runs at a time, one GPU each
#   bash sweep.sh --preset paper --slurm --slurm-opt=--time=24:00:00   # Slurm job array
#   bash sweep.sh --preset demo -- --eval-every 20 # flags after -- go to every train.py run
#   bash sweep.sh --help                           # every option and preset
#
# What happens (all in sweep.py, one Python process; see its docstring):
#   1. plan: the preset's table (or --grid FILE) -> runs with steps, tokens, params (closed form)
#   2. skip runs whose <out>/<tag>.json says ok; rerun failed/preempted ones with --resume
#   3. run train.py once per run (GPU slots, or CPU cores at one thread each), logs in
#      <out>/logs/<tag>.log
#   4. python fit_law.py <out> -> <out>/fit.txt, fit.json, fit.png; one line: is phi identified?
# Output goes to runs/<preset> unless --out is given. Rerunning the same command resumes.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SWEEP_PROG="bash sweep.sh"
exec "${PYTHON:-python}" "$here/sweep.py" "$@"
