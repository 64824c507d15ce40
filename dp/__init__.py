"""fedprompt.dp"""
