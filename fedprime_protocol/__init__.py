"""The FedPrime wire protocol: what the ServerApp and the ClientApps say to each other.

Both apps import it; neither imports the other. It is a Flower adapter like the apps
(``fedprime_core`` never imports Flower):

* :mod:`fedprime_protocol.messages`: the record names, how a state and a train reply are
  packed and read (in the run's wire encoding), the identity query and the client-info
  record.
* :mod:`fedprime_protocol.logs`: how log lines reach the user; a client's lines travel
  back with its reply (the ``client-log`` record) and the server logs them.
"""
