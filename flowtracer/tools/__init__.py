"""Research tools built on the trainer's pieces: ablation grids and their report, flow traces,
the causal masking probe (and their shared analysis helpers)."""
