"""Training the CLAP2Diffusion modules: manifest -> feature cache -> stages 1, 2, 3 (accelerate).

    python -m clap2diffusion_core.training prepare --manifest m.jsonl --cache data/cache --clap ... --sd15 ...
    accelerate launch -m clap2diffusion_core.training train stage1 stage2 stage3 --cache data/cache --sd15 ...
    python -m clap2diffusion_core.training smoke        # CPU, generated data, random test models

See ``cli.py`` for the commands, ``configs/`` for the stage configs, ``trainer.py`` for the loop.
"""
