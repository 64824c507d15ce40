"""fedprompt.server"""
