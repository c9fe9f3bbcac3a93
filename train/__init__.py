"""DeepSpeed training for flamingo-kit: one loop, three stages (LM, contrastive, Flamingo).

``python -m train --config configs/flamingo.yaml key=value ...`` runs in one process (gloo on
CPU); ``deepspeed --num_gpus N --module train --config ...`` runs the same code on many devices.
"""
