#!/usr/bin/env bash
# Side by side on one machine, runs alternated so that a busy moment hits every variant alike:
#   time:  nanoGPT's own train.py (its CPU recipe for Tiny Shakespeare) against this project's train.py at the
#          same settings (with its default dtype, and in float32 as nanoGPT on a CPU), and against the demo config (config/train_shakespeare_char.py): wall time, ms per step,
#          final val loss.
#   loss:  AdamW against Muon, val loss at 500 / 1,000 / 1,500 / 2,000 steps and ms per step, on the char demo
#          and on a small GPT-2-BPE model (config/train_shakespeare.py's shape); and Muon with a schedule of 1,100
#          steps (--short_iters), against AdamW's loss after 2,000.
#
#   bash runs/compare_nanogpt.sh --nanogpt=PATH --input=PATH/input.txt [--what=time|loss|all] [--rounds=2]
#   bash runs/compare_nanogpt.sh ... --iters=20 --rounds=1   # a quick check that everything runs (figures mean nothing)
#
# --nanogpt: a checkout of github.com/karpathy/nanoGPT (measured at commit 3adf61e); it is copied to a temporary
#   folder and run there, nothing of it is written here. --input: Tiny Shakespeare (input.txt of
#   github.com/karpathy/char-rnn), prepared for both projects from that one file. Results: out-compare/compare.md
#   (--out_dir=DIR), with every command, the run logs next to it, and the machine's load (uptime) around each run.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=out-compare
WHAT=all
ROUNDS=2
ITERS=2000
MODELS="char bpe"  # --models=char,bpe: which models --what=loss trains
SHORT=1100  # --short_iters: the length of the shorter Muon schedule
NANOGPT=""
INPUT=""
PY=${PYTHON:-python}
for arg in "$@"; do
    case $arg in
        --out_dir=*) OUT=${arg#*=} ;;
        --what=*) WHAT=${arg#*=} ;;
        --rounds=*) ROUNDS=${arg#*=} ;;
        --iters=*) ITERS=${arg#*=} ;;
        --short_iters=*) SHORT=${arg#*=} ;;
        --models=*) MODELS=${arg#*=} ;;
        --nanogpt=*) NANOGPT=${arg#*=} ;;
        --input=*) INPUT=${arg#*=} ;;
        --python=*) PY=${arg#*=} ;;
        *) echo "unknown argument '$arg'; expected --nanogpt=PATH --input=FILE --what=time|loss|all --rounds=N" \
              "--iters=N --short_iters=N --models=char,bpe --out_dir=DIR --python=PATH" >&2; exit 2 ;;
    esac
done
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # nanoGPT runs in another folder
case $WHAT in time|loss|all) ;; *) echo "unknown --what='$WHAT'; expected time, loss or all" >&2; exit 2 ;; esac
[ -f "$INPUT" ] || { echo "--input='$INPUT' is not a file: pass Tiny Shakespeare's input.txt, e.g. from" \
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt" >&2; exit 2; }
if [ "$WHAT" != loss ] && [ ! -f "$NANOGPT/train.py" ]; then
    echo "--nanogpt='$NANOGPT' holds no train.py: git clone https://github.com/karpathy/nanoGPT && git -C nanoGPT" \
         "checkout 3adf61e, then pass --nanogpt=nanoGPT (or use --what=loss)" >&2
    exit 2
fi
mkdir -p "$OUT/logs"
REPORT=$OUT/compare.md
CHAR=$OUT/data/shakespeare_char
BPE=$OUT/data/shakespeare
"$PY" data/shakespeare_char/prepare.py --input="$INPUT" --out_dir="$CHAR" > "$OUT/logs/prepare_char.txt"
[ "$WHAT" = time ] || "$PY" data/shakespeare/prepare.py --input="$INPUT" --out_dir="$BPE" > "$OUT/logs/prepare_bpe.txt"

# nanoGPT's CPU recipe for Tiny Shakespeare (its README, "I only have a macbook"), with a log line every 50
# iterations
NG_ARGS=(config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=50
         --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=$ITERS
         --lr_decay_iters=$ITERS --dropout=0.0)
# the same run with this project's train.py: nanoGPT's train.py defaults plus its config/train_shakespeare_char.py
OURS_NG_ARGS=(--dataset=shakespeare_char --data_dir="$CHAR" --data_order=random --n_layer=4 --n_head=4 --n_embd=128
              --block_size=64 --batch_size=12 --total_batch_size=0 --dropout=0.0 --bias=False --learning_rate=1e-3
              --min_lr=1e-4 --warmup_iters=100 --max_iters=$ITERS --lr_decay_iters=$ITERS --beta2=0.99
              --weight_decay=0.1 --grad_clip=1.0 --eval_interval=250 --eval_iters=20 --log_interval=50
              --always_save_checkpoint=False --device=cpu --compile=False)
QUICK=()  # a short check run needs a shorter warmup than the decay
[ "$ITERS" -ge 1000 ] || { QUICK=(--warmup_iters=$((ITERS / 10))); SHORT=$((ITERS / 2)); }
OURS_NG_ARGS+=("${QUICK[@]}")
DEMO_ARGS=(config/train_shakespeare_char.py --data_dir="$CHAR" --max_iters=$ITERS --lr_decay_iters=$ITERS "${QUICK[@]}")
# AdamW against Muon: evaluations every 100 steps, to find where Muon passes AdamW's final loss
CHAR_ARGS=("${DEMO_ARGS[@]}" --eval_interval=100 --sample_interval=0)
BPE_ARGS=(config/train_shakespeare.py --data_dir="$BPE" --max_iters=$ITERS --lr_decay_iters=$ITERS --eval_interval=100
          --log_interval=100 "${QUICK[@]}")

now() { "$PY" -c 'import time; print(f"{time.time():.3f}")'; }
load() { cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || uptime | sed 's/.*load averages*: //'; }

run() {  # run NAME DIR COMMAND...: time it, keep its output, print one result line
    local name=$1 dir=$2 t0 t1 l0
    shift 2
    l0=$(load)
    t0=$(now)
    (cd "$dir" && "$@") > "$OUT/logs/$name.txt" 2>&1 || { echo "$name failed, see $OUT/logs/$name.txt" >&2; exit 1; }
    t1=$(now)
    "$PY" - "$name" "$OUT/logs/$name.txt" "$t0" "$t1" "$l0" "$(load)" "$*" >> "$OUT/results.jsonl" <<'EOF'
import json, re, statistics, sys
name, log, t0, t1, l0, l1, cmd = sys.argv[1:]
text = open(log).read()
# nanoGPT: "step N: train loss A, val loss B" and "iter N: ... time Xms"; ours: "eval N: ... val loss B" and
# "iter N/M | ... | X ms/iter"
vals = {int(i): float(v) for i, v in re.findall(r"^(?:step|eval) (\d+):.*?val loss (\d+\.\d+)", text, re.M)}
ms = [float(x) for x in re.findall(r"time ([\d.]+)ms", text) + re.findall(r"\| ([\d.]+) ms/iter", text)]
ms = [x for x in ms[1:]] or ms  # the first line of nanoGPT times its first step and evaluation
print(json.dumps({"name": name, "wall_s": float(t1) - float(t0), "val": vals, "ms_per_iter": statistics.median(ms),
                  "load_before": l0, "load_after": l1, "command": cmd}))
EOF
    tail -1 "$OUT/results.jsonl"
}

SCRATCH=""
trap '[ -n "$SCRATCH" ] && rm -rf "$SCRATCH"' EXIT
if [ "$WHAT" != loss ]; then
    SCRATCH=$(mktemp -d)
    cp -r "$NANOGPT" "$SCRATCH/nanogpt"
    mkdir -p "$SCRATCH/nanogpt/data/shakespeare_char"
    cp "$INPUT" "$SCRATCH/nanogpt/data/shakespeare_char/input.txt"
    (cd "$SCRATCH/nanogpt/data/shakespeare_char" && "$PY" prepare.py) > "$OUT/logs/prepare_nanogpt.txt"
fi
: > "$OUT/results.jsonl"
echo "machine: $(nproc 2>/dev/null || sysctl -n hw.ncpu) cores, $("$PY" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'); load at start: $(load)"
for round in $(seq "$ROUNDS"); do
    if [ "$WHAT" != loss ]; then
        run "nanogpt_$round" "$SCRATCH/nanogpt" "$PY" train.py "${NG_ARGS[@]}" --out_dir="$SCRATCH/out"
        run "ours_nanogpt_settings_$round" . "$PY" train.py "${OURS_NG_ARGS[@]}" --out_dir="$OUT/ours_ng" --overwrite=True
        # nanoGPT computes in float32 on a CPU; ours autocasts to bfloat16 where the CPU has it natively: the same
        # run in float32 separates that from the rest of the step
        run "ours_nanogpt_settings_fp32_$round" . "$PY" train.py "${OURS_NG_ARGS[@]}" --dtype=float32 \
            --out_dir="$OUT/ours_ng_fp32" --overwrite=True
        run "ours_demo_$round" . "$PY" train.py "${DEMO_ARGS[@]}" --out_dir="$OUT/demo" --overwrite=True
    fi
    if [ "$WHAT" != time ]; then
        for model in ${MODELS//,/ }; do
            [ $model = char ] && ARGS=("${CHAR_ARGS[@]}") || ARGS=("${BPE_ARGS[@]}")
            for opt in adamw muon; do
                run "${model}_${opt}_$round" . "$PY" train.py "${ARGS[@]}" --optimizer=$opt --out_dir="$OUT/${model}_$opt" --overwrite=True
            done
            # Muon with a shorter schedule (warmup and decay fitted to SHORT steps): does it reach AdamW's loss?
            run "${model}_muon${SHORT}_$round" . "$PY" train.py "${ARGS[@]}" --optimizer=muon --max_iters=$SHORT \
                --lr_decay_iters=$SHORT --out_dir="$OUT/${model}_muon$SHORT" --overwrite=True
        done
    fi
done

# the table: median and range over the rounds of each variant
"$PY" - "$OUT/results.jsonl" "$(load)" > "$REPORT" <<'EOF'
import collections, json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
by = collections.defaultdict(list)
for r in runs:
    by[r["name"].rsplit("_", 1)[0]].append(r)
def span(xs, fmt):
    return (fmt % statistics.median(xs)) + (f" ({fmt % min(xs)}-{fmt % max(xs)})" if len(xs) > 1 else "")
print("| run | wall s | ms/iter | val 500 | val 1000 | val 1500 | val 2000 (or last) | load before/after |")
print("| - | - | - | - | - | - | - | - |")
for name, rs in by.items():
    cells = []
    for it in (500, 1000, 1500):
        v = [r["val"][str(it)] for r in rs if str(it) in r["val"]]
        cells.append(span(v, "%.4f") if v else "-")
    last = [r["val"][max(r["val"], key=int)] for r in rs if r["val"]]
    loads = "; ".join(f"{r['load_before'].split()[0]}/{r['load_after'].split()[0]}" for r in rs)
    print(f"| {name} | {span([r['wall_s'] for r in rs], '%.1f')} | {span([r['ms_per_iter'] for r in rs], '%.1f')} | "
          + " | ".join(cells) + f" | {span(last, '%.4f') if last else '-'} | {loads} |")
# where Muon first reaches AdamW's loss at its last evaluation (median over the rounds)
for model in ("char", "bpe"):
    if f"{model}_adamw" in by and f"{model}_muon" in by:
        target = statistics.median(r["val"][max(r["val"], key=int)] for r in by[f"{model}_adamw"])
        hits = [min((int(i) for i, v in r["val"].items() if v <= target), default=None) for r in by[f"{model}_muon"]]
        print(f"\n{model}: Muon reaches AdamW's final val loss {target:.4f} at step "
              + ", ".join(str(h) if h is not None else "never" for h in hits) + " (each round)")
        for name in (n for n in by if n.startswith(f"{model}_muon") and n != f"{model}_muon"):
            short = [r["val"][max(r["val"], key=int)] for r in by[name]]
            print(f"{model}: Muon with a {name.split('muon')[1]}-step schedule ends at val loss "
                  f"{statistics.median(short):.4f}, " + ("at or below" if statistics.median(short) <= target else "above")
                  + f" AdamW's {target:.4f} after {max(int(i) for r in by[f'{model}_adamw'] for i in r['val'])} steps")
print()
print(f"{len(runs)} runs, alternated; load average at the end: {sys.argv[2]}. Commands:")
for name, rs in by.items():
    print(f"- {name}: `{rs[0]['command']}`")
EOF
cat "$REPORT"
echo "written: $REPORT, $OUT/results.jsonl, $OUT/logs/"
