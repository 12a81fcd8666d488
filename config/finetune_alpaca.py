# Instruction-tune GPT-2 124M on Stanford Alpaca (tatsu-lab/alpaca: 52,002 instruction/response records) with
# Alpaca's prompt template, then ask it something:
#   python finetune.py config/finetune_alpaca.py
#   python sample.py --init_from=resume --out_dir=out-sft --instruct="Name three primary colors."
#   torchrun --standalone --nproc_per_node=8 finetune.py config/finetune_alpaca.py
#   python finetune.py --init_from=resume --out_dir=out-sft   # after a Ctrl-C or SIGTERM: continues the run
# Without network: download alpaca_data.json (github.com/tatsu-lab/stanford_alpaca) elsewhere and add
# --dataset=alpaca_data.json. Records already formatted ({"prompt": "...### Response:\n", "response": ...}):
# add --prompt_template=none. GPT-2 124M is slow on a CPU; a first look:
#   python finetune.py config/finetune_alpaca.py --device=cpu --max_records=500 --max_iters=50 --eval_iters=2 \
#       --warmup_iters=5

task = 'instruct'
out_dir = 'out-sft'  # the starting point of align.py config/align_hh.py --init_from=out-sft
init_from = 'gpt2'  # OpenAI's 124M (downloaded once by load_openai.py); 'gpt2-medium' (355M) answers better
dataset = 'tatsu-lab/alpaca'
prompt_template = 'alpaca'  # the records are instruction/input/output; sample.py --instruct uses the same
val_fraction = 0.02  # ~1,000 held-out records: eval loss and the answers shown at each sample_interval
# Most records are far shorter than 512 GPT-2 tokens; longer ones lose prompt tokens first (truncate='left',
# the response is what the loss learns from) and their count is printed at start.
block_size = 512

# Alpaca trained LLaMA-7B for 3 epochs at lr 2e-5, batch 128, 3% warmup, cosine decay (stanford_alpaca
# README). Raschka's GPT-2 instruction fine-tuning (LLMs-from-scratch, ch07) uses AdamW, lr 5e-5, weight
# decay 0.1, 2 epochs: a small model takes the larger step. Batch: 8 records x 4 accumulation steps = 32; the
# loss is the mean over all response tokens of those 32 records, however they are split into micro-batches.
batch_size = 8
gradient_accumulation_steps = 4
epochs = 2.0  # ~3,200 steps
learning_rate = 5e-5
warmup_iters = 100  # ~3% of the steps, as Alpaca
weight_decay = 0.1

eval_interval = 200
eval_iters = 20  # 160 held-out records per eval
sample_interval = 400
