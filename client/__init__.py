"""fedprompt.client"""
