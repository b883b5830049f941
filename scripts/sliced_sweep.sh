#!/usr/bin/env bash
# Run grids one time slice at a time on machines that start bare (lent or preemptible GPU nodes):
#   1. rebuild the corpus with the reference corpus's tokenizer and settings (no rustbpe needed)
#      and check it is byte-identical to the reference (prepare_data.py --expect-checksum);
#   2. run what fits in the rest of the slice (sweep.sh --time-limit), preset after preset;
#      finished run JSONs already in runs/<preset> are skipped;
#   3. pack the run JSONs and logs into one archive to take home.
# Before the next slice, unpack the last archive in the checkout (tar xzf ARCHIVE): it holds
# runs/<preset>/, so the finished runs are skipped and the rest continue.
#
#   bash scripts/sliced_sweep.sh PRESET[,PRESET...] REFERENCE_DATA_DIR SECONDS ARCHIVE [sweep.sh options...]
#   bash scripts/sliced_sweep.sh mini .carry/ref8k 530 "$OUT/mini.tgz" --no-fit   # how results/mini was made
#   bash scripts/sliced_sweep.sh mini-trunc,mini-hc REF 540 cases.tgz --no-fit    # both case studies
#
# REFERENCE_DATA_DIR needs only meta.json and the tokenizer files of the corpus built the first time.
# Several presets must share one data directory; each gets what is left of SECONDS in turn.
set -euo pipefail
if [ $# -lt 4 ]; then
    sed -n '2,16p' "$0"
    exit 2
fi
presets=${1//,/ } reference=$2 seconds=$3 archive=$4
shift 4
cd "$(dirname "${BASH_SOURCE[0]}")/.."
start=$(date +%s)
# torch.compile's cache inside the checkout: runs of one shape compile once, and a machine that is
# still warm for the next slice keeps it (the device tool keeps ignored paths between calls)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$PWD/.cache/inductor}

# the presets' data dir, and the prepare_data.py flags that rebuild the reference corpus
# shellcheck disable=SC2086  # presets are words without spaces
read -r data flags < <(python - "$reference" $presets <<'PY'
import json, sys
import sweep
reference, names = sys.argv[1], sys.argv[2:]
unknown = [n for n in names if n not in sweep.PRESETS]
if unknown:
    sys.exit(f"sliced_sweep: no preset {', '.join(unknown)} (choose from {', '.join(sweep.PRESETS)})")
dirs = {sweep.PRESETS[n].data for n in names}
if len(dirs) > 1:
    sys.exit(f"sliced_sweep: the presets use different data directories ({', '.join(sorted(dirs))}); "
             "run them in separate slices")
config = json.load(open(f"{reference}/meta.json"))["config"]
flags = ["--source", config["source"], "--val-fraction", str(config["val_fraction"]),
         "--shard-tokens", str(config["shard_tokens"]), "--tokenizer", reference]
if config.get("include_site_packages"):
    flags.append("--include-site-packages")
print(dirs.pop(), " ".join(flags))
PY
)
# shellcheck disable=SC2086  # flags are words without spaces, built above
python prepare_data.py $flags --out "$data" --expect-checksum "$reference/meta.json"

status=0 outs=()
for preset in $presets; do
    out="runs/$preset"
    outs+=("$out")
    left=$(( seconds - ($(date +%s) - start) ))
    if [ "$left" -lt 60 ]; then
        echo "[sliced_sweep] ${left}s left: $preset waits for the next slice"
        continue
    fi
    bash sweep.sh --preset "$preset" --data "$data" --out "$out" --time-limit "$left" "$@" || status=$?
done
mkdir -p "${outs[@]}"
tar czf "$archive" --exclude='*.pt' "${outs[@]}"
echo "[sliced_sweep] sweep exit $status; $(find "${outs[@]}" -maxdepth 1 -name '*.json' | wc -l) JSON(s) in $archive"
