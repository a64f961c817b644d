# Convert the AR model of config/shakespeare_char_ar.py into a block-diffusion LM.
# python train.py config/shakespeare_char_dlm.py   (after the AR run)
out_dir = "out-shakespeare-char-dlm"
init_from = "out-shakespeare-char-ar"
dataset = "shakespeare_char"
mode = "dlm"
attention = "block"         # clean context [x_t ; x_0], the method
block_size = 4                # characters are short tokens: a small block keeps the bound close to AR
mask_half_life = 0.1        # position-dependent masking, the paper's lambda
context_len = 128
batch_size = 64
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 450
warmup_iters = 20
eval_interval = 150
eval_iters = 20
log_interval = 50
device = "auto"             # the GPU where there is one, else the CPU (the times quoted are on 2 CPU cores)
compile = False
