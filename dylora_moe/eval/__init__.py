"""Honest evaluation: HumanEval and MBPP pass@k from generated code that really ran, in a sandbox.

``task`` (one problem), ``benchmarks`` (the registry of ``humaneval`` and ``mbpp``),
``generation`` (batched completions), ``sandbox`` + ``sandbox_worker`` (isolated execution),
``passk`` (the unbiased estimator), ``scoring``, ``report``, ``config`` (``EvalConfig``), ``evaluate``
(everything ``dylora eval`` does), ``command`` (its flags and handler) and ``during_training`` (pass@k
at the trainer's evaluation points).
"""
