# A conversion that fits in a lesson: the shipped AR model (pretrained/tasks-ar) into a dLM on
# three of the five tasks, sort, add and chain: 15.4 minutes on 2 cores of an AMD EPYC with AVX2
# only (family 25), compilation and evaluations included (about 0.5 s per iteration), after which
# bench.py shows the dLM at threshold 0.9 at 99.0% with 3.47 tokens per forward, 2.32x the AR
# model's tokens/s at batch 1, the AR model at 99.3% (docs/conversions.md, the lesson).
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
eval_interval = 1000
eval_iters = 10
log_interval = 50
device = "auto"             # the GPU where there is one, else the CPU (the times quoted are on 2 CPU cores)
compile = True              # --compile=False where no C++ compiler is at hand (9.4 minutes on an Intel Xeon with AMX, docs/conversions.md)
