"""The method: FedPrime and its baselines, framework-free (never imports ``flwr``).

* :mod:`.methods`: what each ``method`` is (pools, aggregation), in one table;
* :mod:`.model`: the prompted model over a frozen backbone (prompt pools, query maps, head),
  :mod:`.retrieval`: per-sample top-kappa retrieval and its regulariser;
* :mod:`.training`: one client's local training and evaluation;
* :mod:`.federated`: one round on the server: validating replies, FedAvg of the shared parts
  and the aligned pools (:class:`~.federated.GlobalState`);
* :mod:`.aggregation`: FedAvg and FedPrime's clustering-alignment engine
  (:class:`~.aggregation.ClusterAlignment`), :mod:`.interpool`: the clients' personal inter
  pools, :mod:`.pfpt`: PFPT's probabilistic prompt aggregation.
"""
