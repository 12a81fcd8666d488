# Sentiment of IMDB movie reviews (stanfordnlp/imdb: 25,000 train and 25,000 test reviews, half positive) with
# GPT-2 124M and a linear head on each review's last token, then classify a sentence:
#   python finetune.py config/finetune_imdb.py
#   python finetune.py config/finetune_imdb.py --init_from=resume --predict="What a wonderful film"
# Reference: Raschka's LLMs-from-scratch ch06/03_bonus_imdb-classification, train_gpt.py: GPT-2 124M, every layer
# trained, 1 epoch, AdamW at a constant 5e-5, weight decay 0.1, batch 8, reviews cut to 256 tokens -> 91.88% test
# accuracy. Training only the last block (--n_trainable_layers=1) is faster and needs less memory; that is the
# setting of his main chapter, which reaches 95.67% on SMS spam (ch06). GPT-2 124M is slow on a CPU; a first look:
#   python finetune.py config/finetune_imdb.py --device=cpu --max_records=500 --max_iters=50 --eval_iters=2 \
#       --n_trainable_layers=1 --final_eval=False
# The same head on GLUE SST-2 (67k sentences), from the Hub or from its own TSV files (sentence<TAB>label):
#   python finetune.py config/finetune_imdb.py --dataset=nyu-mll/glue --name=sst2 --test_split='' \
#       --val_split=validation --out_dir=out-sst2
#   python finetune.py config/finetune_imdb.py --dataset=SST-2/train.tsv --val_split=SST-2/dev.tsv \
#       --test_split='' --text_field=sentence --label_names="['negative','positive']" --out_dir=out-sst2

task = 'classify'
out_dir = 'out-imdb'
init_from = 'gpt2'  # OpenAI's 124M (downloaded once by load_openai.py), or your own pre-trained checkpoint
dataset = 'stanfordnlp/imdb'  # its 'unsupervised' split (label -1) is not used
test_split = 'test'  # scored at each eval (a sample) and in full at the end (final_eval)
val_fraction = 0.1  # 2,500 training reviews held out
label_field = 'label'  # 0 = 'neg', 1 = 'pos' (the dataset's ClassLabel names are stored with the head)
block_size = 256  # as the reference; many reviews are longer (the count of truncated ones is printed)
truncate = 'right'  # keep a long review's first 256 tokens, as the reference; 'left' keeps its end instead
n_trainable_layers = -1  # all

batch_size = 8
epochs = 1.0  # ~2,800 steps
learning_rate = 5e-5
warmup_iters = 0
decay_lr = False  # the reference's constant rate
weight_decay = 0.1
eval_interval = 500
eval_iters = 20  # 160 reviews per split per eval; the final full pass is exact
final_eval = True  # per-class precision/recall/F1 and out-imdb/confusion.png for val and test at the end
