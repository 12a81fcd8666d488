# IsoFLOP scaling sweep on FineWeb-Edu for one node of 8 GPUs (Hoffmann et al. 2022, "Chinchilla",
# arXiv:2203.15556, approach 2): 5 model sizes x 3 compute budgets; each run's max_iters comes from its
# flops_budget (train.py prints the arithmetic), so a smaller model sees more tokens at the same compute.
#   python data/fineweb/prepare.py            # sample-10BT: the smallest model at 1e18 reads ~7B tokens
#   python sweep.py config/sweep_scaling_fineweb.py              # one run per GPU (--parallel defaults to 8)
#   python sweep.py config/sweep_scaling_fineweb.py --print_only=True > cmds.txt   # or a SLURM job array
# NOT RUN YET: estimates only. Run time ~ flops_budget / achieved FLOP/s: 1e18 on one H100 at ~40% MFU of its
# 989 TFLOP/s bf16 is ~42 minutes; all 15 runs are 7e18 FLOPs, ~40 minutes on 8 GPUs plus evaluations and compiles.
# results.md fits the best val loss against N and C over *all* finished runs; for Chinchilla's approach 2 take,
# per budget, the size of lowest loss from results.csv (a parabola in log N through each budget's 5 points).

script = "train.py"
base = ["config/train_fineweb.py"]
runs = [  # 12 * n_layer * n_embd^2 non-embedding parameters: 7M, 21M, 85M (GPT-2 small), 200M, 300M
    {"name": "L6-d320", "n_layer": 6, "n_embd": 320, "n_head": 5},
    {"name": "L8-d448", "n_layer": 8, "n_embd": 448, "n_head": 7},
    {"name": "L12-d768", "n_layer": 12, "n_embd": 768, "n_head": 12},
    {"name": "L16-d1024", "n_layer": 16, "n_embd": 1024, "n_head": 16},
    {"name": "L24-d1024", "n_layer": 24, "n_embd": 1024, "n_head": 16},
]
grid = {"flops_budget": [1e17, 3e17, 1e18]}
fixed = {"total_batch_size": 131072,  # 2**17 tokens: enough steps (>= 300) for the largest model at 1e17
         "batch_size": 16, "warmup_iters": 100, "eval_interval": 250, "eval_iters": 50, "sample_interval": 0,
         "wandb_log": False}
out_dir = "out-sweep-scaling-fineweb"
