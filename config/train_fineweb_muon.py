# GPT-2 (124M) on FineWeb-Edu as config/train_fineweb.py, with Muon for the matrices inside the blocks. Give both
# files, this one second: it changes only the optimizer, the run's name and its folder.
#   torchrun --standalone --nproc_per_node=8 train.py config/train_fineweb.py config/train_fineweb_muon.py
# Same data, batch (524,288 tokens), steps and learning-rate schedule as the AdamW run, so the two loss curves
# compare the optimizers alone.
#
# Where the numbers come from: modded-nanogpt's optimizer comparison on GPT-2 small and FineWeb, 8xH100
# (github.com/KellerJordan/modded-nanogpt, records/102924_Optimizers: README.md and the Muon log 8d6193f4),
# whose Muon has torch.optim.Muon's update (Nesterov momentum, 5 Newton-Schulz steps in bfloat16, scaled by
# sqrt(max(1, fan_out / fan_in))):
#   Muon lr 0.02, momentum 0.95 on the blocks' matrices; Adam betas (0.9, 0.95) at lr 0.0036 on the tied
#   embedding / LM head; zero weight decay, "found to be empirically optimal" there for every optimizer;
#   524,288 tokens per step. That run used no warmup and a linear decay over the last 28% of 5,100 steps; here the
#   AdamW run's warmup and cosine stay, to change one thing at a time.
# What to expect: "~1.5x better sample-efficiency" than Adam (modded-nanogpt README, section "Muon optimizer");
# on GPT-2 medium, 5,960 steps to 2.92 val loss with Muon against 10,500 with AdamW (its
# records/061525_GPT2MediumOptimizationLeaderboard). At 1.5x, about 12,700 of the 19,073 steps would reach the
# AdamW run's final loss: an extrapolation to this model, not a measurement.
# Newton-Schulz costs a few matmuls of 768-wide matrices per step: under 2% of the step time on 8xH100 (the README).

out_dir = "out-fineweb-muon"
wandb_run_name = "gpt2-124m-muon"

optimizer = "muon"
muon_lr = 0.02  # records/102924_Optimizers: Muon(lr=0.02, momentum=0.95)
muon_momentum = 0.95
muon_ns_steps = 5  # Keller Jordan's coefficients are tuned for 5 steps
muon_ns_dtype = "auto"  # bfloat16 on GPUs, as there
learning_rate = 0.0036  # AdamW for the embedding (= LM head), LayerNorms and biases: embed_learning_rate there
min_lr = 0.00036  # learning_rate / 10, as config/train_fineweb.py
weight_decay = 0.0  # zero for Muon and AdamW alike, as there (AdamW's)
muon_weight_decay = 0.0  # (Muon's own key)
