# the quick-start demo: a tiny model on flip-flop, a few minutes on a laptop CPU
# (ASEntmax by default; the README's line also trains --attn=softmax --scale=none)
task = 'flipflop'
attn = 'entmax'
scale = 'asentmax'
pos = 'nape'
n_layer = 2
n_head = 4
n_embd = 64
batch_size = 32
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 50
max_iters = 1000
log_interval = 100
eval_interval = 500
eval_n = 100
overwrite = True   # the demo is meant to be run again
