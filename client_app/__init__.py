"""The FedPrime ClientApp: local training and evaluation (a Flower adapter over fedprime_core)."""

import os

# Torch's OpenMP threads spin while they wait for work. Where other processes compete for
# the cores (simulated clients, other jobs) the spinning made server-side evaluation of the
# embedded held-out sets 10x slower on this project's 2-core machine under load (58-72 s
# instead of 6-8 s with 2 threads; 1 thread took 6-8 s either way). Threads that sleep
# instead took as long as one thread there. Set before torch is imported; a value the user
# set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
