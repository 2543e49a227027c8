"""The names of the inter-pool regimes, owned by the method and read by the configuration schema.

Light (no numpy, no torch): ``fedprime_core.config`` builds its options from these tuples, and
the ClientApp of a site served by a resident worker imports the configuration without torch.
:mod:`fedprime_core.method.interpool` implements each regime.
"""

from __future__ import annotations

#: How the server merges the clients' personal inter pools: by content, or by slot index.
MERGE_MODES = ("align", "position")
#: How a client's inter pool starts: the most popular centres, or prompts of its own.
INIT_MODES = ("shared", "independent")
#: Where each round's alignment starts: the slots' clusters, or from scratch.
ALIGN_STARTS = ("warm", "cold")
#: What the alignment compares: the prompts, their change this round, or their retrieval profile.
ALIGN_ON = ("prompt", "delta", "usage")
