"""Tooling around the method: running and reporting experiments, precomputing image features,
launching Flower processes, injecting faults.

* :mod:`.experiments`: grid files of real ``flwr run`` federations (``python -m
  fedprime_core.tools.experiments``), split into plan, run and report;
* :mod:`.features`: the image-feature precompute CLI (``python -m fedprime_core.tools.features``);
* :mod:`.launch`: starting ``flwr`` processes and stopping exactly the ones a run started;
* :mod:`.faults`: the ``fault-plan`` testing aid; :mod:`.cli`: run-config helpers
  (``python -m fedprime_core.tools.cli``).
"""
