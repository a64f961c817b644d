# Convert the task AR model (config/tasks_ar.py) into a block-diffusion LM (about 10 minutes on
# 2 CPU cores). python train.py config/tasks_dlm.py, then python bench.py --out_dir=out-tasks-dlm
out_dir = "out-tasks-dlm"
init_from = "out-tasks-ar"
dataset = "tasks"
mode = "dlm"
attention = "block"         # clean context [x_t ; x_0], the method
block_size = 8              # answers are short; 16 did worse in this budget (README, Tasks)
mask_half_life = 0.1        # the paper's lambda
# With token shift the logits at i-1 predict token i, as in the AR model: a masked token right
# after clean ones is predicted by the AR model's own circuits. The paper prefers no shift after
# billions of tokens; in this 10-minute budget no shift (lr 2e-3, 600 iters) reached 28% at
# threshold 0.9, shift 78% (block 16; README, Tasks).
token_shift = True
# Prompts stay clean and only answers (with the rest of their last block) are masked, as when
# decoding: no loss is spent on the prompts' random letters, which nothing can predict.
answers_only = True
context_len = 96
batch_size = 64
learning_rate = 1e-3        # 2e-3 wiped out the arithmetic the AR model learned (with prompts masked too)
min_lr = 1e-4
max_iters = 800
warmup_iters = 20
eval_interval = 400
eval_iters = 20
log_interval = 50
device = "cpu"
compile = False
