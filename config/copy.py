# copy (paper: 2 layers, d 256, 16 heads x 16, lr 1e-3, 20k warmup, batch 128, 156,250 steps)
task = 'copy'
n_layer = 2
n_head = 16
n_embd = 256
batch_size = 128
learning_rate = 1e-3
min_lr = 1e-5
warmup_iters = 1000
max_iters = 20000
eval_interval = 2000
log_interval = 500
