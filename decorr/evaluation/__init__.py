"""The evaluation part: transfer attacks run on sources and evaluated on targets, ensembles as targets,
detection, statistics with intervals, comparisons and summaries, reports (tables, JSON, CSV, plots) and
adversarial examples as files.

Modules: ``transfer`` (:func:`~decorr.evaluation.transfer.evaluate_transfer`), ``ensembles``, ``detection``,
``metrics``, ``stats``, ``compare``, ``summary``, ``seeds``, ``alignment``, ``tables``, ``report``,
``adversarial_files``.
"""
