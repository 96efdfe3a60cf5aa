"""The training part: a run (accelerate, run-directory lock, TensorBoard, checkpoints, resume), the one loop,
and the methods as small task objects.

Modules: ``run`` (:class:`~decorr.training.run.TrainingRun`), ``loop`` (:func:`~decorr.training.loop.fit`,
the only optimiser step), ``methods`` (the ensemble methods by name), ``ensemble`` (the ensemble trainer),
``classifier`` (one classifier), ``runlock``, ``batchnorm``. Nothing here imports the evaluation part.
"""
