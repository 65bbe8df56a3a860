"""Evaluation: answer extraction, scorers, statistics, tasks, runner and reports."""
