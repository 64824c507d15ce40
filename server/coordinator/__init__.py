"""The coordinator (``fedprompt server``): the Flower ServerApp (server_app) and its merging strategies (strategies),
the run settings (config), checkpoints, message exchange, the secure rounds' coordinator side (secure_round),
federated DP-OPT (dpopt), the network front (front) and the processes and command line (cli)."""
