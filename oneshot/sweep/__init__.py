"""Sweeps: a grid config expanded into RunSpecs (config.py), run in process (runner.py), recorded one
JSON line per run (store.py), and reported as tables and plots (report.py)."""
from .config import SweepConfig, key_config, label, load_config, run_key
from .report import make_report
from .runner import run_sweep
from .store import append_record, read_results

__all__ = ["SweepConfig", "key_config", "label", "load_config", "run_key", "make_report", "run_sweep",
           "append_record", "read_results"]
