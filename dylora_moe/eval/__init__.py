"""Honest evaluation: HumanEval and MBPP pass@k from generated code that really ran, in a sandbox.

``task`` (one problem), ``benchmarks`` (the registry of ``humaneval`` and ``mbpp``),
``generation`` (batched completions), ``sandbox`` + ``sandbox_worker`` (isolated execution),
``passk`` (the unbiased estimator), ``scoring``, ``report``, ``command`` (``dylora eval``) and
``during_training`` (pass@k at the trainer's evaluation points).
"""
