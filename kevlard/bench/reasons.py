"""What docs/BENCHMARKS.md says beside the numbers: each benchmark's command, and why a missed target
was missed, from what was measured on this machine (docs/bench/ANALYSIS.md has the measurements)."""
from __future__ import annotations

COMMANDS = {
    "serving": "bash bench/serving_core.sh      # PEER_VENV=/tmp/peer: a venv with 'transformers[serving]' gguf accelerate",
    "faults": "bash bench/fault_tolerance.sh",
    "emulated": "bash bench/emulated_restart.sh",
    "peer": "bash bench/peer_restart.sh       # PEER_VENV as above",
    "scaling": ".venv/bin/python bench/scaling.py",
    "gpu": "bash bench/gpu_check.sh          # on a machine with an NVIDIA GPU",
}
WHY = {
    "kill_probe": "until the spare takes over (a few tenths of a second later) the buddy computes its stage "
                  "for both pipelines, and the probe queues behind the resumed requests' steps on two shared "
                  "cores; the failure-free run's own p99 TTFT at this load was {ff_ttft_p99:.3f} s",
    "serving": "in these rounds kevlard served {kevlard} output tokens/s and the peer {peer}; each moves with the "
               "state of this shared VM, separately: the earlier make benches of 2026-12-05 had kevlard at 163 "
               "and 125 (an A/B of their two codes on one host gave the same: docs/bench/ANALYSIS.md, eighth "
               "session) and the peer at 95-105 both times; in this run the peer was about 30 % faster than "
               "in those, kevlard not",
    "hang_probe": "the probe, sent at the moment of the hang, went to the hung pipeline and waited out the "
                  "detection (the heartbeat timeout after the last heartbeat), then its replay and the resumed "
                  "requests' steps on two shared cores; a probe sent to the other pipeline answers in about 0.1 s",
    "recovery_90": "the surviving workers share two cores with the spare that is hosting the stage",
    "restart_ratio": "in restart mode the probe is served by the pipeline that did not fail, untouched "
                     "({restart:.2f} s), while in kevlar mode both pipelines go through the buddy until the "
                     "spare takes over, so the probe shares it with the resumed requests; the restarted "
                     "pipeline itself served again after {restored} s (new worker processes, weights read "
                     "from the safetensors cache: the row below); the emulated-reload section stretches the "
                     "restart to an 8B model's",
    "replication": "on CPU the source copies a step's KV straight into the buddy's shared-memory pool and acks "
                   "it itself, at most every 500 ms apart (a prompt's blocks at once), once the step's result is "
                   "sent; but at this load the machine is saturated, so every thread that wakes on the two "
                   "cores the steps need turns into queueing, and the prefix cache shares a block only once "
                   "every stage's buddy holds it. One run's p99 is its slowest request or two: single pairs "
                   "spread over 10 points; A/B rounds in docs/bench/ANALYSIS.md",
    "window": "during the failover the buddy serves two pipelines' worth of its stage on shared cores",
    "emulated": "the surviving pipeline absorbs most of the load while the other one reloads: decoding is "
                "memory-bound, so on its own core it batches more (one pipeline alone served 9.2 requests/s "
                "of 32 tokens here, at 5.6 s mean latency), so the baseline's requests wait seconds, not "
                "the 60 s reload; the paper's 500x TTFT comes from requests waiting out a 10-minute restart. "
                "At 8 requests/s the machine is near saturation: every pass, the failure-free one too, has "
                "TTFT bumps of its own (see the plot)",
    "emulated_one": "kevlard's own first tokens bound the ratio: its failure-window TTFT is a tenth to a few tenths of a "
                    "second on two shared cores (the table above), failure-free too, so a 60 s reload, which a request arriving at a random "
                    "moment of it waits half of on average, gives a few hundred x at most; the paper's restart "
                    "took 10 minutes",
    "recomputed": "requests whose replica lagged by more than a block when the worker died",
}
