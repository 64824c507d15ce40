"""SecAgg+ (Bell et al. 2020) against a malicious server: the protocol's state machines and plan (protocol), the
holder's side (client), the aggregation server's side (server) and its cryptography and quantisation (crypto)."""
