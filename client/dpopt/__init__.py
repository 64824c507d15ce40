"""DP-OPT on a holder: the private generation of candidate instructions (generation), its teachers and text
handling (teachers, text), the federated holder side (holder) and `fedprompt dpopt` (cli)."""
