"""The ingress: HTTP signalling, aiortc viewer sessions, fan-out, the viewer page."""
