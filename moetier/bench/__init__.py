"""``moetier bench``: cost, accuracy and performance of a workload, with sparsity-aware utilization.

``shape``: a model's sizes by role; ``metrics``: bytes and FLOPs per step, S-MBU, S-MFU,
cost (pure formulas); ``hardware``: datasheet peaks, or this machine's measured;
``workload``: the requests; ``system_moetier`` / ``system_transformers``: run them and
time each step; ``summary``: per-phase numbers; ``run``: result.json; ``report``: charts
and the table. The engine never imports this package.
"""
