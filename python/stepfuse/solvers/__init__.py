"""Solver families: each builds the coefficient plan (a StepProgram per step)."""

from .program import OUTPUT, StepProgram

__all__ = ["OUTPUT", "StepProgram"]
