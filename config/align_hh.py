# DPO on Anthropic's helpful-and-harmless preferences (Anthropic/hh-rlhf: ~161k training pairs, 8.5k test pairs).
#   python align.py config/align_hh.py --init_from=out-sft
#   torchrun --standalone --nproc_per_node=8 align.py config/align_hh.py --init_from=out-sft
#   python align.py --init_from=resume --out_dir=out-align-hh       # after Ctrl-C or a preemption: continue exactly
# The dataset's own files, downloaded once (no network while training), one half of it:
#   python align.py config/align_hh.py --init_from=out-sft --dataset=hh-rlhf/harmless-base/train.jsonl.gz \
#       --val_split=hh-rlhf/harmless-base/test.jsonl.gz
# Recipe of the DPO paper (Rafailov et al. 2023, arXiv:2305.18290, section 6.1 and appendix B): start from a model
# fine-tuned on the preferred responses (SFT), then one epoch of DPO with beta 0.1, 64 pairs per step and 150
# warmup steps. Watch the held-out reward accuracy and logp_drift in the eval lines.

out_dir = "out-align-hh"
init_from = "gpt2"  # an SFT checkpoint is better (--init_from=out-sft); the reference is the starting model
dataset = "Anthropic/hh-rlhf"  # also: dataset_dir = 'harmless-base' or 'helpful-base' for one half
val_split = "test"
val_pairs = 512  # held-out pairs scored at each eval: +-2% on reward accuracy at 1 sigma, a few seconds on a GPU
eval_interval = 250
# hh-rlhf dialogues are mostly a few hundred GPT-2 tokens; longer ones lose their earliest turns (the count of
# truncated pairs is printed at start). 1024 keeps almost all, at 2x the cost per pair.
block_size = 512
# right-most split as in the DPO authors' code (prompt = everything up to the last "\n\nAssistant:"); a pair whose
# two conversations differ earlier is dropped and counted instead of stopping the run
drop_mismatched = True

loss_type = "dpo"
beta = 0.1  # the paper's value: a larger beta keeps the policy closer to the reference; 0.01-0.5 are common
precompute_ref = True  # one reference pass up front: the same work as one epoch of per-step reference
# forwards, but no second copy of the model in memory during training

# 64 pairs (128 sequences) per step as in the paper: 8 per micro-step x 8 accumulation steps on one GPU
# (the same global batch on 8 GPUs with 1 accumulation step). Halve batch_size if memory runs out.
batch_size = 8
total_batch_pairs = 64
max_iters = 0  # one epoch (~2,500 steps)
# The paper uses 1e-6 (RMSprop) for 2.8B-6B models; GPT-2 124M-350M tolerates a larger step with AdamW. If the
# held-out reward accuracy stalls while logp_drift falls fast (both responses pushed down), lower it.
learning_rate = 5e-6
warmup_iters = 150
lr_schedule = "constant"
