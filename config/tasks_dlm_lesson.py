# A conversion that fits in a lesson: the shipped AR model (pretrained/tasks-ar) into a dLM on
# three of the five tasks, sort, add and chain: 12.4 minutes on 2 cores of an AMD EPYC (family 25,
# AVX-512 BF16), compilation and 10 evaluations included; 12.0 eager (--compile=False). Every
# evaluation prints the share of 50 held-out val problems decoded right and the tokens per forward
# at threshold 0.9: 16% at iteration 0, 92% at 600, 100% at 3.41 at the end (docs/lesson_log.txt,
# docs/lesson.md). bench.py then shows the dLM at threshold 0.9 at 98.3% with 3.43 tokens per
# forward, 2.15x the AR model's tokens/s at batch 1, the AR model at 99.3% (docs/conversions.md).
#   python data/tasks/prepare.py --weights=rev=0,dup=0,sort=2,add=1,chain=1 --out_dir=data/tasks_lesson
#   python train.py config/tasks_dlm_lesson.py
#   python bench.py --out_dir=out-tasks-dlm-lesson
# The full conversion (config/tasks_dlm.py) spends most of its 4500 iterations teaching the string
# tasks to look a letter up by its position; with one string task of three, and that one the
# shortest, far fewer iterations decode in parallel. bench.py scores the three tasks trained.
out_dir = "out-tasks-dlm-lesson"
init_from = "pretrained/tasks-ar"
dataset = "tasks_lesson"
mode = "dlm"
attention = "block"
block_size = 8
mask_half_life = 0.1
token_shift = True
answers_only = True
context_len = 96
batch_size = 32
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 1700
warmup_iters = 20
eval_interval = 200         # each evaluation also decodes 50 held-out val problems (train.py's eval_problems)
eval_iters = 10
log_interval = 50
device = "auto"             # the GPU where there is one, else the CPU (the times quoted are on 2 CPU cores)
compile = True              # --compile=False where no C++ compiler is at hand (no slower here: 12.0 minutes)
