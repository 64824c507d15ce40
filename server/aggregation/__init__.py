"""The aggregation server (``fedprompt aggregator``): the gRPC service (service), its registry of prompts, rounds,
streams and task vectors (registry*), the secure rounds the holders run (secagg_rounds), the store (store*) and
the command line (cli: ``fedprompt aggregator``, ``fedprompt prompts``, ``fedprompt registry``)."""
