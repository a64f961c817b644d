# The reference of every ablation: the task conversion (block attention with clean context,
# token shift, answers only, lambda 0.1, block 8, full training) from out-tasks-ar, at 200
# iterations: the 28 runs of a sweep trained in 2 h 10 min on 2 cores of an AMD EPYC (AVX2), and
# were scored in 53 minutes more (docs/ablations.md). Its settings are written
# out here, not taken from config/tasks_dlm.py, so that the README's tables stay what these files
# produce. Each other file here changes one thing. python ablate.py runs them all,
# python train.py config/ablate/<variant>.py one.
init_from = "out-tasks-ar"
dataset = "tasks"
mode = "dlm"
attention = "block"
block_size = 8
mask_half_life = 0.1
token_shift = True
answers_only = True
context_len = 96
batch_size = 64
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 200
warmup_iters = 20
eval_interval = 200
log_interval = 50
eval_iters = 5              # the sweep scores every run itself (ablate.py)
device = "cpu"
compile = False
out_dir = "out-ablate/reference"
