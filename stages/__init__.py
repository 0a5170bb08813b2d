"""DVC stages: each module reads its slice of params.yaml, calls flowmatch and writes its outputs."""
