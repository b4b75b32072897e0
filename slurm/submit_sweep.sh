#!/bin/bash
# Submit slurm/sweep.sbatch as a job array sized from the sweep table: one task per data
# row (--array=0-(rows-1)) and enough tasks for the largest row (--ntasks=max ranks).
# Usage, from the repository root:
#   slurm/submit_sweep.sh [TABLE] [more sbatch options, e.g. --account=X --partition=Y]
set -euo pipefail
TABLE=slurm/sweep.tsv
if (($#)) && [[ $1 != -* ]]; then TABLE=$1; shift; fi
[[ -f $TABLE ]] || { echo "submit_sweep: no sweep table $TABLE" >&2; exit 1; }

ROWS=$(grep -c -v -E '^[[:space:]]*(#|$)' "$TABLE" || true)
((ROWS > 0)) || { echo "submit_sweep: $TABLE has no data rows" >&2; exit 1; }
RANKS=$(grep -v -E '^[[:space:]]*(#|$)' "$TABLE" | cut -f1 | sort -n | tail -n 1)

export MESHMPI_SWEEP=$TABLE  # sbatch passes the environment on to the job
exec sbatch --array="0-$((ROWS - 1))" --ntasks="$RANKS" "$@" "$(dirname "$0")/sweep.sbatch"
