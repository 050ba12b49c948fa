"""Encoders: the registry, torchvision and timm backbones, the fingerprint network and its
checkpoints. Preprocessing travels with each encoder."""
