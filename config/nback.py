# 2-back, a per-position task (no released training code: the recipe is ours)
task = 'nback'
n_layer = 2
n_head = 8
n_embd = 256
batch_size = 128
learning_rate = 1e-3
min_lr = 1e-5
warmup_iters = 500
max_iters = 5000
eval_interval = 1000
log_interval = 500
