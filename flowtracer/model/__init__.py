"""The policy model: loading (bundled name, folder, GGUF, hub id) + LoRA, attention capture,
layer presets and the optional Triton kernels.

policy.py   load_policy, prepare_policy, reference_mode (adapters off), merged_lora
forward.py  teacher_forced_pass: log-probs, entropies and the map in one forward (or the map alone)
capture.py  capture_attention: the head/layer-aggregated attention map from an sdpa/flash forward
layers.py   layer presets (early, middle, late, all) and their resolution for a model depth
kernels.py  optional Triton kernels (CUDA), each with a torch twin
"""
