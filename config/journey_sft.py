# Stage 2 of the journey (runs/journey.sh): teach the pre-trained model to answer "Who speaks the last line?" about
# a speech and the first line of its reply, for the plays' 20 most talkative characters; the held-out questions
# ask about other lines than any record (data/shakespeare_tasks/prepare.py).
#   python data/shakespeare_tasks/prepare.py --out_dir=out-journey/data/tasks
#   python finetune.py config/journey_sft.py
# The held-out task accuracy is measured by eval.py afterwards (runs/journey.sh, stage 5).

task = "instruct"
out_dir = "out-journey/sft"
init_from = "out-journey/pretrain"
dataset = "out-journey/data/tasks/sft_train.jsonl"
val_split = "out-journey/data/tasks/sft_val.jsonl"  # the held-out questions
block_size = 128
truncate = "left"  # the few longest questions lose the start of the template, never the excerpt or answer

batch_size = 16
max_iters = 1000  # 16,000 records: 4.4 passes over the 3,600 questions (at 300 steps it still answers the most
# frequent name to every question; the names of whoever is answered start to count after ~500)
learning_rate = 2e-3  # measured: 1e-3 learns the same in about twice the steps
warmup_iters = 50
min_lr = 2e-4
weight_decay = 0.1

eval_interval = 250
eval_iters = 5  # 80 held-out questions per eval; eval.py scores all 400 at the end
log_interval = 25
sample_interval = 0  # the answers are scored by eval.py instead
device = "cpu"
compile = False
