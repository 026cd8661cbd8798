"""Launchers: Ray job and DeepSpeed/torchrun entry points (installed as metadistil_scale.launch)."""
