#!/usr/bin/env bash
# Run a grid one time slice at a time on machines that start bare (lent or preemptible GPU nodes):
#   1. rebuild the corpus with the reference corpus's tokenizer and settings (no rustbpe needed)
#      and check it is byte-identical to the reference (prepare_data.py --expect-checksum);
#   2. run what fits in the rest of the slice (sweep.sh --time-limit); finished run JSONs already
#      in the output directory (carried back in from earlier slices) are skipped;
#   3. pack the run JSONs, logs and fit into one archive to take home.
#
#   bash scripts/sliced_sweep.sh PRESET REFERENCE_DATA_DIR SECONDS ARCHIVE [sweep.sh options...]
#   bash scripts/sliced_sweep.sh mini .carry/ref8k 530 "$OUT/mini.tgz" --no-fit   # how results/mini was made
#
# REFERENCE_DATA_DIR needs only meta.json and the tokenizer files of the corpus built the first time.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,12p' "$0"
    exit 2
fi
preset=$1 reference=$2 seconds=$3 archive=$4
shift 4
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
# torch.compile's cache inside the checkout: runs of one shape compile once, and a machine that is
# still warm for the next slice keeps it (the device tool keeps ignored paths between calls)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}

# the preset's data dir, and the prepare_data.py flags that rebuild the reference corpus
read -r data flags < <(python - "$preset" "$reference" <<'EOF'
import json, sys
import sweep
preset, reference = sys.argv[1], sys.argv[2]
config = json.load(open(f"{reference}/meta.json"))["config"]
flags = ["--source", config["source"], "--val-fraction", str(config["val_fraction"]),
         "--shard-tokens", str(config["shard_tokens"]), "--tokenizer", reference]
if config.get("include_site_packages"):
    flags.append("--include-site-packages")
print(sweep.PRESETS[preset].data, " ".join(flags))
EOF
)
# shellcheck disable=SC2086  # flags are words without spaces, built above
python prepare_data.py $flags --out "$data" --expect-checksum "$reference/meta.json"

out="runs/$preset"
left=$(( seconds - ($(date +%s) - start) ))
status=0
bash sweep.sh --preset "$preset" --data "$data" --out "$out" --time-limit "$left" "$@" || status=$?
tar czf "$archive" --exclude='*.pt' "$out"
echo "[sliced_sweep] sweep exit $status; $(ls "$out"/*.json 2>/dev/null | wc -l) JSON(s) in $archive"
