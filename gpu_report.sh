#!/usr/bin/env bash
# The one GPU run whose numbers go into README.md and docs/performance.md, in parts run in this order,
# each under its own time limit; a part that fails or runs out of time does not stop the others.
#
#   bash gpu_report.sh OUT_DIR            on a CUDA GPU: at most 12.5 minutes (690 s of limits, 10 s to stop each)
#   bash gpu_report.sh OUT_DIR --quick    the same parts at reduced size on the CPU (test_gpu_report.py runs it)
#
# OUT_DIR gets one log per part and report.jsonl, a JSON line per part: its exit status, seconds, limit,
# and what it measured (bench.py's summary line, pytest's counts). Eight files in all, none in a subfolder.
# The exit status is 0 when every part succeeded, 1 otherwise.
set -u
out=${1:?usage: bash gpu_report.sh OUT_DIR [--quick]}
mode=${2:-full}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")"
scratch=$(mktemp -d)  # train_tiny's run folder and base-model cache: not part of the report
trap 'rm -rf "$scratch"' EXIT
export PYTHONUNBUFFERED=1
failed=0

part() {  # part NAME SECONDS COMMAND...: run COMMAND under a limit, log to OUT/NAME.log, a line to report.jsonl
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    [ "$rc" -eq 0 ] || failed=1
    python3 - "$name" "$rc" "$((SECONDS - start))" "$limit" "$out/$name.log" >> "$out/report.jsonl" <<'PY'
import json, re, sys
name, rc, seconds, limit, log = sys.argv[1:]
row = {"part": name, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit), "timed_out": rc in ("124", "137")}
lines = open(log, errors="replace").read().splitlines()
for line in reversed(lines):  # bench.py ends with its summary as one JSON line
    if line.startswith("{"):
        try:
            row["result"] = json.loads(line)
            break
        except ValueError:
            pass
counts = [line for line in lines if re.search(r"\d+ (passed|failed)", line)]
if counts:  # pytest's closing line
    row["pytest"] = counts[-1].strip("= ")
print(json.dumps(row))
PY
    tail -n 1 "$out/report.jsonl"
}

if [ "$mode" = "--quick" ]; then
    device=cpu
    tests=(test_sorsa.py -k "split_shapes_dtypes_and_residual")
    demo=(--quick --methods sorsa --steps 4 --batch_size 8 --pretrain_steps 20 --test_size 10)
    quick=(--quick)
    limits=(60 120 120 120 240)
else
    device=cuda
    tests=(--ignore=test_gpu_report.py)  # the suite but this script's own CPU check
    demo=()
    quick=()
    limits=(150 120 150 60 180)
fi

part env 30 python3 -c "import torch, platform; print(platform.platform(), 'torch', torch.__version__,
    'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
part pytest "${limits[0]}" python3 -m pytest -q -p no:cacheprovider -rs "${tests[@]}"
part train_tiny "${limits[1]}" python3 train_tiny.py --device "$device" "${demo[@]}" \
    --out "$scratch/run" --cache "$scratch/cache"
cp "$scratch/run/log.jsonl" "$out/train_tiny.jsonl" 2>/dev/null
part bench_llama "${limits[2]}" python3 bench.py --device "$device" --llama "${quick[@]}"  # section 6, regularizer share
part bench_peft "${limits[3]}" python3 bench.py --device "$device" --peft "${quick[@]}"    # section 8
part bench_nf4 "${limits[4]}" python3 bench.py --device "$device" --nf4 "${quick[@]}"      # section 9: the 16 GB recipe
exit $failed
