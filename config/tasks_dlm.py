# Convert the task AR model (config/tasks_ar.py) into a block-diffusion LM: 76 minutes on 2 cores
# of an AMD EPYC with AVX2 only (family 25), about 45 on an Intel Xeon with AMX. From the shipped
# AR model (99.0%) it reached 99.6% at threshold 0.9 with 4.77 tokens per forward (pretrained/tasks-dlm).
#   python train.py config/tasks_dlm.py
#   python bench.py --out_dir=out-tasks-dlm
#   python train.py config/tasks_dlm.py --max_iters=800 --compile=False
# The last stops after 9.4 minutes on the Intel Xeon (from an earlier AR model: 83% at threshold
# 0.9, 1.35 tokens per forward; the string tasks have not yet learned to decode in parallel;
# docs/conversions.md). On a CPU with AMX or AVX-512 BF16, --dtype=bfloat16 runs 1.5x faster (30
# minutes on the Intel Xeon; from that earlier AR model 96.4% at 4.11 against 98.2% at 4.23).
out_dir = "out-tasks-dlm"
init_from = "out-tasks-ar"
dataset = "tasks"
mode = "dlm"
attention = "block"         # clean context [x_t ; x_0], the method
# Blocks of 8: answers are short. Blocks of 16 did worse in an early 800-iteration conversion
# (docs/conversions.md, "What was tried") but as well as 8 at matched tokens per forward in the
# 1000-iteration ablations (docs/ablations.md): no general verdict at this size.
block_size = 8
mask_half_life = 0.1        # the paper's lambda
# Token shift on (this project's choice for the task demo; the paper's method has it off): the
# logits at i-1 predict token i, as in the AR model, so a masked token right after clean ones is
# predicted by the AR model's own circuits. The paper prefers no shift after billions of tokens
# (config/ablate/shift_off.py is that variant); in early 600-800-iteration conversions no shift
# reached 28% at threshold 0.9, shift 78% (block 16; docs/conversions.md), and in the ablations
# at 1000 iterations no shift is 24 points worse (docs/ablations.md).
token_shift = True
# Prompts stay clean and only answers (with the rest of their last block) are masked, as when
# decoding: no loss is spent on the prompts' random letters, which nothing can predict.
answers_only = True
context_len = 96
batch_size = 64
learning_rate = 1e-3        # 2e-3 wiped out the arithmetic the AR model learned (with prompts masked too)
min_lr = 1e-4
# Masked letters further than one position past the last clean one must be looked up by position,
# a skill the AR model never needed: it appears between 1500 and 3000 iterations (docs/conversions.md).
max_iters = 4500
warmup_iters = 20
eval_interval = 1500
eval_iters = 20
log_interval = 50
device = "auto"             # the GPU where there is one, else the CPU (the times quoted are on 2 CPU cores)
compile = True              # about 20% faster on CPU; --compile=False where no C++ compiler is at hand
