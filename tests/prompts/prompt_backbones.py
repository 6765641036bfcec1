"""Tiny random ViTs of the three supported kinds (TinyViT, timm, open_clip), for the prompt tests."""

import torch

OPEN_CLIP_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
KINDS = ("tiny_vit", "timm", "open_clip")


def make_backbone(kind: str, depth: int = 2, seed: int = 0):
    """``(model, input shape)`` of a tiny random ViT of ``kind``."""
    torch.manual_seed(seed)
    if kind == "tiny_vit":
        from avalanche_merge.models.vit import TinyViT, TinyViTConfig

        return TinyViT(TinyViTConfig(dim=16, depth=depth, heads=2)), (1, 28, 28)
    if kind == "timm":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=depth, num_heads=2,
                                 num_classes=0, qkv_bias=True), (3, 32, 32)
    from avalanche_merge.models.clip import ZeroShotClassifier, open_clip_architecture

    cfg = {**OPEN_CLIP_CFG, "vision_cfg": {**OPEN_CLIP_CFG["vision_cfg"], "layers": depth}}
    model = open_clip_architecture("tiny", pretrained=None, model_cfg=cfg)
    return ZeroShotClassifier(model.visual, torch.randn(3, 16)), (3, 32, 32)
