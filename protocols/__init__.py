"""fedprompt.protocols"""
