"""Imported by the workers' fork server alone, first of launcher.WORKER_MODULES, never by the daemon.

A SIGTERM sent to the daemon's whole process group (systemd's KillMode=control-group) killed the
fork server too, and multiprocessing then read every worker's sentinel as the worker's death: the
draining daemon recovered from failures that never were. The fork server ignores SIGTERM and
SIGHUP (a closed terminal), and so do the workers it forks; it still exits when the daemon does (its
end of the channel closes), and a SIGKILL still ends it. It ignores SIGINT (Ctrl-C) by itself.
"""
import signal

signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGHUP, signal.SIG_IGN)
