# Learning rate x optimizer on Shakespeare char: AdamW alone against Muon (for the matrices inside the blocks) +
# AdamW (for the rest), 4 learning rates each, the demo's model for 500 steps: 8 runs, 4 minutes on a 2-core CPU
# with --parallel=2 (two at a time, one thread each; results in docs/experiments.md).
#   python data/shakespeare_char/prepare.py
#   python sweep.py config/sweep_optim.py --parallel=2
# results.md then has the heat table (rows: optimizer, columns: learning_rate) and heat.png.
# learning_rate is AdamW's: with Muon it moves only the embeddings and LayerNorms (Muon's own step is muon_lr,
# fixed at 0.02 here; sweep it with grid = {"muon_lr": [...]}).

script = "train.py"
base = ["config/train_shakespeare_char.py"]
grid = {"optimizer": ["adamw", "muon"], "learning_rate": [1e-3, 3e-3, 1e-2, 3e-2]}
fixed = {"max_iters": 500, "lr_decay_iters": 500, "eval_interval": 100, "eval_iters": 20, "sample_interval": 0,
         "log_interval": 100, "device": "cpu"}
out_dir = "out-sweep-optim"
