# flip-flop (paper: 4 layers, d 256, 8 heads; the released config inherits head_dim 256, pitfall P5: we use 32)
task = 'flipflop'
n_layer = 4
n_head = 8
n_embd = 256
batch_size = 128
learning_rate = 1e-3
min_lr = 1e-5
warmup_iters = 1000
max_iters = 10000
eval_interval = 2000
log_interval = 500
