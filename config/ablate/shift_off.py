# Token shift off: the logits at a masked position predict that position (the paper's choice).
exec(open("config/ablate/reference.py").read())
token_shift = False
out_dir = "out-ablate/shift_off"
