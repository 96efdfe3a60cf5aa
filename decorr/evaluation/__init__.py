"""The evaluation part: transfer attacks run on sources and evaluated on targets, ensembles as targets,
detection, statistics with intervals, comparisons and summaries, reports (tables, JSON, CSV, plots) and
adversarial examples as files.

Modules: ``options`` (:class:`~decorr.evaluation.options.TransferOptions`), ``transfer``
(:func:`~decorr.evaluation.transfer.evaluate_transfer`), ``selection`` (models named by specs:
:func:`~decorr.evaluation.selection.evaluate_checkpoints`), ``passes`` (batches across processes),
``command`` (eval/transfer.py's flags), ``sweep``, ``ensembles``, ``detection``,
``metrics``, ``stats``, ``compare``, ``summary``, ``seeds``, ``alignment``, ``tables``, ``report``,
``adversarial_files``.
"""
