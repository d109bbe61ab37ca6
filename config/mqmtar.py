# multi-query multi-token associative recall (paper: 4 layers, d 512, 16 heads x 32, FFN 1024, lr 2e-4,
# 20k warmup, batch 128, 390,625 steps; our MLP is 4 x d = 2048 wide)
task = 'mqmtar'
n_layer = 4
n_head = 16
n_embd = 512
batch_size = 128
learning_rate = 3e-4
min_lr = 1e-5
warmup_iters = 2000
max_iters = 20000
eval_interval = 2000
log_interval = 500
