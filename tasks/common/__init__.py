"""What both tasks share.

``base`` (BaseTask), ``optim`` (param groups), ``schedules`` (warmup + cosine), ``ema``, ``guards``,
``checkpoint_io``, ``writers``, ``sampling``, ``distributed`` (each image counted once under DDP), ``images``
(reading, ImageNet stats) and ``checks`` (input checks whose errors name the file and the fix).
"""
