"""The autotuner: settings, timing, the tuning loop and the on-disk store.

Nothing here imports an op: the dispatcher hands the tuner its candidates and a way to run them.
"""
