# reverse (paper: 6 layers, d 256, 8 heads x 32, lr 4e-4, 20k warmup, batch 128, 234,375 steps). The MLP is
# 4 x d = 1,024 wide, as in the released config; the paper's Table 5 gives 512 (--mlp_width=512 with --block=gemma2)
task = 'reverse'
n_layer = 6
n_head = 8
n_embd = 256
batch_size = 128
learning_rate = 5e-4
min_lr = 1e-5
warmup_iters = 1000
max_iters = 20000
eval_interval = 2000
log_interval = 500
