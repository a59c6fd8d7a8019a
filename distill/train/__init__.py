"""The one training loop: optimizer and schedule, checkpoints, parallel strategies (DDP, FSDP, DeepSpeed), precision."""
