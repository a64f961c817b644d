# The reference of every ablation: the task conversion (config/tasks_dlm.py: block attention
# with clean context, token shift, answers only, lambda 0.1, block 8, full training) from
# out-tasks-ar, a quarter of its iterations so that the sweep fits in about 90 minutes on 2 CPU
# cores. Each other file here changes one thing. python ablate.py runs them all, python train.py
# config/ablate/<variant>.py one.
exec(open("config/tasks_dlm.py").read())
max_iters = 200
eval_interval = 200
log_interval = 50
eval_iters = 5              # the sweep scores every run itself (ablate.py)
out_dir = "out-ablate/reference"
