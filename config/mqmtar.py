# multi-query multi-token associative recall (paper: Gemma-2 block, 4 layers, d 512, 16 heads x 32, FFN 1024,
# lr 2e-4, 20k warmup, batch 128, 390,625 steps; here GPT-2's block and a 4 x d = 2048-wide MLP: --block=gemma2
# --mlp_width=1024 give the paper's). Half the paper's learning rate, with a short warmup: at 5e-4 half the seeds never
# left the loss plateau in 30,000 steps; at 2e-4 and at 1e-4 all four left it by step 6,000, and 1e-4's mean validation
# score over four seeds was higher at every length up to 256x
# (results/synthetic/README.md, the 2026-11-23 rounds at 5dc1ff8 and c885038).
# 30,000 steps took 8.9 minutes on an H100 with --compile=True, two runs sharing it, and 11.3 on a slower H100 host.
task = 'mqmtar'
n_layer = 4
n_head = 16
n_embd = 512
batch_size = 128
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 1000
max_iters = 30000
eval_interval = 2000
log_interval = 500
