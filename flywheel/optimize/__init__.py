"""Prompt optimisation: variants, few-shot bootstrap and reflective rewrites, chosen by paired tests.

    from flywheel.optimize import optimize_prompt
    result = optimize_prompt(spec, store)
"""

from flywheel.optimize.search import Candidate, OptimizeResult, optimize_prompt

__all__ = ["Candidate", "OptimizeResult", "optimize_prompt"]
