"""Nothing hangs, nothing is lost, nothing is silent: what keeps a run safe around the runtime.

preflight.py   bad input refused before torchrun or memory is committed (data, memory)
runlock.py     one job per run directory: the lock file rank 0 holds
checkpoint.py  atomic, resumable checkpoints (DCP), and what a resume must agree with
safeload.py    reading checkpoint files anyone may have written: tensors only
signals.py     SIGTERM/SIGINT: finish the step, checkpoint, exit with one line
watchdog.py    every rank's heartbeat; a stalled or dead rank named, the others stopped
guard.py       non-finite losses and gradients caught where they appear
memcap.py      the per-rank memory cap: predicted, measured, and the OOM record
faults.py      fault injection for the reliability tests (debug.fail_*)
"""
