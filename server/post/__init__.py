"""POST, the model provider's side: distil a student (distill), move a prompt tuned on it to the teacher
(transfer), ``fedprompt post`` (cli) and ``fedprompt demo-post`` (demo)."""
