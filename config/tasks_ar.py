# AR pretraining on the task mix of data/tasks (about 10 minutes on 2 CPU cores).
# python data/tasks/prepare.py && python train.py config/tasks_ar.py
out_dir = "out-tasks-ar"
dataset = "tasks"
mode = "ar"
context_len = 96
batch_size = 64
n_layer = 4
n_head = 4
n_kv_head = 4
n_embd = 128
intermediate_size = 512
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 1700
warmup_iters = 50
eval_interval = 300
eval_iters = 20
log_interval = 100
device = "cpu"
compile = False
