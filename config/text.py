# language modelling on this Python's standard library (about 2.4M tokens of code; data/text.py), at a training
# context of 512 tokens. Half the steps are needle steps (windows holding a needle line, its question and the answer,
# only the answer scored), so that a small model learns the retrieval that eval_length.py --probe=niah asks at 1x-16x
# the context; the output layer is the embedding table, which makes copying a token easy to learn. 23.1M parameters
# with Python 3.11's stdlib, 12.5M of them the table of its 32.5K tokens. Softmax + RoPE, the usual LM baseline:
#   python train.py config/text.py --attn=softmax --scale=none --pos=rope
task = 'text'
block_size = 512
needle_frac = 0.5
tie_embeddings = True
attn = 'entmax'
scale = 'asentmax'
pos = 'nape'
n_layer = 6
n_head = 6
n_embd = 384
batch_size = 32
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 200
max_iters = 2500
weight_decay = 0.1
log_interval = 100
eval_interval = 250
eval_n = 100
