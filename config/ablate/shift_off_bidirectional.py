# Token shift off, with bidirectional attention.
exec(open("config/ablate/reference.py").read())
attention = "bidirectional"
token_shift = False
out_dir = "out-ablate/shift_off_bidirectional"
