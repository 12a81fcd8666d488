# Stage 2 of the journey (runs/journey.sh): teach the pre-trained model to answer "Who speaks next?" about a few
# speeches of a scene, with held-out questions from plays it never read (data/shakespeare_tasks/prepare.py).
#   python data/shakespeare_tasks/prepare.py --out_dir=out-journey/data/tasks
#   python finetune.py config/journey_sft.py
# The held-out task accuracy is measured by eval.py afterwards (runs/journey.sh, stage 5).

task = "instruct"
out_dir = "out-journey/sft"
init_from = "out-journey/pretrain"
dataset = "out-journey/data/tasks/sft_train.jsonl"
val_split = "out-journey/data/tasks/sft_val.jsonl"  # the held-out plays' questions
block_size = 128
truncate = "left"  # the few longest questions lose the start of the template, never the excerpt or answer

batch_size = 16
max_iters = 300  # 4,800 records: 1.2 passes over the 4,000 questions
learning_rate = 1e-3  # a small model fine-tuned on one narrow task takes a large step
warmup_iters = 30
min_lr = 1e-4
weight_decay = 0.1

eval_interval = 100
eval_iters = 5  # 80 held-out questions per eval; eval.py scores all of them at the end
log_interval = 25
sample_interval = 0  # the answers are scored by eval.py instead
device = "cpu"
compile = False
