"""Memory: the planner (predicted peak per phase, from the model's shape) and measurement (observed peaks).

planner.py  flowtracer plan, fit's `auto` generation chunk size and its refusal of configs that do not fit
measure.py  measure_peak: the RSS (CPU) or allocator (CUDA) high-water mark of a block
"""
