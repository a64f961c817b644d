# A tiny character-level AR model on Tiny Shakespeare: about 7 minutes on 2 CPU cores.
# python data/shakespeare_char/prepare.py && python train.py config/shakespeare_char_ar.py
out_dir = "out-shakespeare-char-ar"
dataset = "shakespeare_char"
mode = "ar"
context_len = 128
batch_size = 64
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
intermediate_size = 384
learning_rate = 2e-3        # a tiny model trains fast from scratch
min_lr = 2e-4
max_iters = 1000
warmup_iters = 50
eval_interval = 250
eval_iters = 20
log_interval = 50
device = "auto"             # the GPU where there is one, else the CPU (the times quoted are on 2 CPU cores)
compile = False
