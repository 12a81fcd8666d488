# Fine-tune OpenAI's GPT-2 on Shakespeare (GPT-2 tokens): it keeps its English and picks up the style in minutes.
#   python data/shakespeare/prepare.py
#   python train.py config/finetune_shakespeare.py                 # downloads GPT-2's weights once (load_openai.py)
#   python sample.py --init_from=resume --out_dir=out-shakespeare --start="ROMEO:"
#   python train.py --init_from=resume --out_dir=out-shakespeare   # after a Ctrl-C: continues the saved run
# Bigger GPUs: --init_from=gpt2-xl (1.5B) --batch_size=1 fits 40 GB with the same 32 accumulation steps.
# CPU: --device=cpu --compile=False --block_size=256 --batch_size=4 --total_batch_size=4096 (minutes per iteration).

out_dir = "out-shakespeare"
init_from = "gpt2"  # 124M; 'gpt2-medium', 'gpt2-large', 'gpt2-xl' for the larger ones
dataset = "shakespeare"
data_order = "random"
eval_interval = 5
eval_iters = 40
log_interval = 1
always_save_checkpoint = False  # 300k tokens overfit quickly: ckpt.pt keeps the best val loss (a stop: ckpt_last.pt)
wandb_project = "shakespeare"
wandb_run_name = "finetune-gpt2"
sample_interval = 10
sample_prompt = "ROMEO:"
sample_tokens = 64

block_size = 1024  # GPT-2's full context; smaller values cut its position table (faster)
dropout = 0.1  # some regularisation for a small fine-tuning set
batch_size = 8
total_batch_size = 32768  # 32 sequences of 1024 tokens per step (nanoGPT's finetune_shakespeare.py)
learning_rate = 3e-5  # small and constant: nudge the pre-trained weights, do not overwrite them
decay_lr = False
max_iters = 20  # 20 x 32,768 = 655k tokens, about two passes over the training split
