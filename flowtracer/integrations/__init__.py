"""Adapters that put the credit arms into other trainers (floor 6; each imports its trainer lazily).

trl.py  FlowGRPOTrainer / with_flowtracer: TRL's GRPOTrainer with per-token advantages from any arm
        (`pip install 'flowtracer[trl]'`; docs/trl.md)
"""
