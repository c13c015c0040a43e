"""CLAP2Diffusion in pure PyTorch: audio, CLAP, decomposer, projector, adapters, checkpoints, training.

Nothing here imports ComfyUI; the pack's ``nodes/`` wrap these modules for ComfyUI.
"""
