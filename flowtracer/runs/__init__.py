"""What a run leaves on disk, crash-safe: atomic step checkpoints and the CSV metrics logger.

checkpoints.py  AtomicCheckpointIO, StepCheckpoint (saved after the step's logs), rewind on resume
csvlog.py       CSVLogger (whole-line appends, atomic header rewrites), atomic_write_text, append_lines,
                print_and_write (a results table to stdout and --out)
"""
