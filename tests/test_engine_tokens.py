"""Vision transformers in the engine: token and channels-last layouts read as feature maps,
hand-computed Grad-CAM on them, the automatic target layer (transformers, and never a
segmentation network's own output), and what is refused with a reason."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import hooks_left
from torch import nn

from napari_gradcam.cam import explain_batch, find_target_layer, to_heatmaps
from napari_gradcam.cam.layers import spatial_layer_names
from napari_gradcam.cam.tokens import Layout, read_layout, split_tokens, token_grid


class Attention(nn.Module):
    """Single-head self-attention over tokens (N, T, C)."""

    def __init__(self, dim):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), -1)
        return self.proj(attn @ v)


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """Patch embedding, ``prefix`` learnt prefix tokens (declared as ``num_prefix_tokens``
    when ``declare``), blocks, pooled by the first token (or the mean without a prefix)."""

    def __init__(self, dims=2, patch=4, dim=16, depth=2, prefix=1, declare=True, classes=3,
                 in_ch=3, pad=False):
        super().__init__()
        conv = nn.Conv2d if dims == 2 else nn.Conv3d
        self.patch, self.pad = patch, pad
        self.patch_embed = conv(in_ch, dim, patch, stride=patch)
        self.prefix_tokens = nn.Parameter(torch.randn(1, prefix, dim))
        self.pos = nn.Parameter(torch.randn(1, 1024, dim) * 0.5)
        if declare:
            self.num_prefix_tokens = prefix
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        if self.pad:  # dynamic padding up to a multiple of the patch size
            pads = []
            for s in reversed(x.shape[2:]):
                pads += [0, -s % self.patch]
            x = F.pad(x, pads)
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = t + self.pos[:, : t.shape[1]]
        t = torch.cat([self.prefix_tokens.expand(len(t), -1, -1), t], 1)
        t = self.norm(self.blocks(t))
        pooled = t[:, 0] if self.prefix_tokens.shape[1] else t.mean(1)
        return self.head(pooled)


def vit(**kw):
    torch.manual_seed(0)
    return TinyViT(**kw).eval()


def hand_gradcam(model, layer, x, prefix, grid, channels_last=False, covered=None):
    """Grad-CAM the long way: the layer's output, a full backward, then the peers' reshape.
    ``covered``: the padded input size the grid stands for (upsampled to it, then cropped)."""
    store = {}

    def hook(_m, _i, out):
        out.retain_grad()
        store["a"] = out

    h = layer.register_forward_hook(hook)
    try:
        logits = model(x)
        cls = logits.argmax(1)
        logits.gather(1, cls[:, None]).sum().backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    a, g = store["a"].detach(), store["a"].grad
    if channels_last:
        a, g = a.movedim(-1, 1), g.movedim(-1, 1)
    else:
        n, _, c = a.shape
        a = a[:, prefix:].transpose(1, 2).reshape(n, c, *grid)
        g = g[:, prefix:].transpose(1, 2).reshape(n, c, *grid)
    w = g.flatten(2).mean(2)
    raw = (w.view(*w.shape, *([1] * len(grid))) * a).sum(1)
    if covered is None:
        return to_heatmaps(raw, x.shape[2:]), cls
    mode = "bilinear" if len(grid) == 2 else "trilinear"
    up = F.interpolate(raw.relu()[:, None], size=covered, mode=mode, align_corners=False)
    up = up[(slice(None), 0, *(slice(0, s) for s in x.shape[2:]))]
    lo = up.flatten(1).amin(1).view(-1, *([1] * len(grid)))
    hi = up.flatten(1).amax(1).view(-1, *([1] * len(grid)))
    return (up - lo) / (hi - lo), cls


# ---- layouts ----------------------------------------------------------------------------

def test_token_layouts_prefix_and_grid():
    assert split_tokens(197, (224, 224)) == (1, (14, 14))  # ViT's class token, found
    assert split_tokens(198, (224, 224), prefix=2) == (2, (14, 14))  # DeiT, declared
    assert split_tokens(201, (224, 224)) == (5, (14, 14))  # class + 4 registers, found
    assert split_tokens(196, (224, 224), prefix=1) == (0, (14, 14))  # patch embedding: none
    assert split_tokens(141, (224, 160)) == (1, (14, 10))  # not square
    assert split_tokens(226, (230, 230), patch=(16, 16)) == (1, (15, 15))  # padded up
    assert split_tokens(1 + 2 * 4 * 4, (8, 64, 64), patch=(4, 16, 16)) == (1, (2, 4, 4))
    assert token_grid(45, (32, 32)) is None
    assert split_tokens(45, (32, 32)) is None


def test_the_models_patch_size_wins_over_a_smaller_prefix():
    # 4 x 5 patches of 32 plus a class token and 4 registers: with one prefix token the 24
    # rest also form a grid (4 x 6, patch 27..), but the model says its patches are 32
    assert split_tokens(4 * 5 + 5, (128, 160)) == (1, (4, 6))  # nothing declared: smallest
    assert split_tokens(4 * 5 + 5, (128, 160), patch=(32, 32)) == (5, (4, 5))
    assert split_tokens(5 * 7 + 5, (80, 112), patch=(16, 16)) == (5, (5, 7))
    # the declared patch fits no prefix: any stride, as before
    assert split_tokens(1 + 14 * 14, (224, 224), patch=(10, 10)) == (1, (14, 14))
    assert read_layout((1, 25, 8), (128, 160), patch=(32, 32)) == Layout("tokens", (4, 5), 5)


def test_map_layouts_channels_last_only_when_unambiguous():
    assert read_layout((1, 64, 56, 56), (224, 224)) == Layout("map", (56, 56))
    assert read_layout((1, 7, 7, 768), (224, 224)) == Layout("channels_last", (7, 7))
    assert read_layout((1, 56, 56, 96), (224, 224)).kind == "channels_last"
    assert read_layout((1, 7, 14, 768), (224, 448)).kind == "channels_last"
    assert read_layout((1, 3, 3, 3, 768), (96, 96, 96)).kind == "channels_last"
    # a valid-convolution map (a few pixels short) stays a map
    assert read_layout((1, 16, 380, 510), (572, 700)).kind == "map"
    # both readings fit: the layer decides
    assert read_layout((1, 32, 32, 32), (128, 128), layer=nn.LayerNorm(32)).kind == \
        "channels_last"
    assert read_layout((1, 32, 32, 32), (128, 128), layer=nn.Conv2d(3, 32, 3)).kind == "map"
    assert read_layout((1, 10), (32, 32)) is None


def test_layout_round_trip_keeps_prefix_and_is_differentiable():
    out = torch.randn(2, 1 + 12, 5)
    layout = Layout("tokens", (3, 4), 1)
    fmap = layout.to_map(out).requires_grad_(True)
    assert fmap.shape == (2, 5, 3, 4)
    assert torch.equal(fmap[0, :, 0, 1], out[0, 2])  # row-major patches after the prefix
    back = layout.from_map(fmap, out)
    assert torch.equal(back, out) and back.is_contiguous()
    (back[:, 1:] * 2).sum().backward()
    assert torch.equal(fmap.grad, torch.full_like(fmap, 2.0))
    cl = Layout("channels_last", (3, 4))
    x = torch.randn(2, 3, 4, 5)
    assert torch.equal(cl.from_map(cl.to_map(x), x), x)


# ---- hand-computed Grad-CAM -------------------------------------------------------------

@pytest.mark.parametrize("kw, x_shape, prefix, grid", [
    ({"prefix": 1}, (2, 3, 32, 32), 1, (8, 8)),
    ({"prefix": 3, "declare": False}, (2, 3, 32, 32), 3, (8, 8)),  # registers, undeclared
    ({"prefix": 2, "pad": True}, (2, 3, 30, 18), 2, (8, 5)),  # not square, padded
    ({"prefix": 1, "dims": 3, "in_ch": 1}, (2, 1, 16, 16, 12), 1, (4, 4, 3)),  # a 3D ViT
], ids=["cls", "registers", "padded", "3d"])
def test_gradcam_on_tokens_matches_hand(kw, x_shape, prefix, grid):
    model = vit(**kw)
    x = torch.randn(*x_shape, generator=torch.Generator().manual_seed(1))
    expected, cls = hand_gradcam(model, model.blocks[-1].norm1, x, prefix, grid)
    flags = [p.requires_grad for p in model.parameters()]
    res = explain_batch(model, x, "gradcam", "blocks.1.norm1")
    assert res.heatmaps.shape == x.shape[:1] + x.shape[2:]
    assert torch.equal(res.class_ids, cls)
    assert float(expected.flatten(1).amax(1).min()) == 1.0  # not flat: a real check
    torch.testing.assert_close(res.heatmaps, expected, atol=2e-5, rtol=1e-4)
    assert hooks_left(model) == 0 and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())


def test_padded_patch_grid_is_cropped_not_stretched():
    # the model pads 30 x 18 to 32 x 20 (8 x 5 patches of 4): each cell keeps its patch's
    # place, so the map is upsampled to 32 x 20 and cropped, not stretched over 30 x 18
    model = vit(prefix=2, pad=True)
    model.patch_size = 4
    x = torch.randn(2, 3, 30, 18, generator=torch.Generator().manual_seed(1))
    expected, cls = hand_gradcam(model, model.blocks[-1].norm1, x, 2, (8, 5), covered=(32, 20))
    stretched, _ = hand_gradcam(model, model.blocks[-1].norm1, x, 2, (8, 5))
    res = explain_batch(model, x, "gradcam", "blocks.1.norm1")
    assert res.heatmaps.shape == (2, 30, 18) and torch.equal(res.class_ids, cls)
    torch.testing.assert_close(res.heatmaps, expected, atol=2e-5, rtol=1e-4)
    assert (res.heatmaps - stretched).abs().max() > 0.01
    # Score-CAM masks the input with the same cropped maps, and still runs
    assert explain_batch(model, x, "scorecam", "blocks.1.norm1").heatmaps.shape == (2, 30, 18)
    # an input of whole patches is upsampled as before
    whole = torch.randn(1, 3, 32, 20)
    expected, _ = hand_gradcam(model, model.blocks[-1].norm1, whole, 2, (8, 5))
    torch.testing.assert_close(explain_batch(model, whole, "gradcam").heatmaps, expected,
                               atol=2e-5, rtol=1e-4)


def test_timm_dynamic_img_pad_vit_is_cropped():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=(64, 96), patch_size=16, embed_dim=32, depth=2,
                              num_heads=2, reg_tokens=4, num_classes=3, dynamic_img_size=True,
                              dynamic_img_pad=True).eval()
    x = torch.randn(1, 3, 70, 100)
    layer = model.blocks[-1].norm1
    expected, _ = hand_gradcam(model, layer, x, 5, (5, 7), covered=(80, 112))
    res = explain_batch(model, x, "gradcam", "blocks.1.norm1")
    torch.testing.assert_close(res.heatmaps, expected, atol=2e-5, rtol=1e-4)


def test_gradcam_on_channels_last_swin_matches_hand():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64,
                              window_size=4, depths=(1, 1), num_heads=(1, 2), embed_dim=16,
                              num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    name = "layers.1.blocks.0.norm1"
    assert find_target_layer(model, x)[0] == name
    expected, cls = hand_gradcam(model, model.get_submodule(name), x, 0, (8, 8),
                                 channels_last=True)
    res = explain_batch(model, x, "gradcam")
    torch.testing.assert_close(res.heatmaps, expected, atol=2e-5, rtol=1e-4)
    assert torch.equal(res.class_ids, cls)


@pytest.mark.parametrize("method", ["gradcam++", "layercam", "eigencam", "scorecam"])
def test_other_methods_run_on_tokens(method):
    model = vit(prefix=1)
    x = torch.randn(2, 3, 32, 32)
    res = explain_batch(model, x, method, chunk_size=8)
    assert res.heatmaps.shape == (2, 32, 32)
    assert bool(torch.isfinite(res.heatmaps).all())
    assert float(res.heatmaps.amax()) == 1.0


def test_amp_and_k_targets_on_tokens():
    model = vit(prefix=1)
    x = torch.randn(2, 3, 32, 32)
    res = explain_batch(model, x, "gradcam", targets=[[0, 2], [1, -1]], amp="bf16")
    assert res.heatmaps.shape == (2, 2, 32, 32)
    assert bool(torch.isfinite(res.heatmaps).all())
    assert float(res.heatmaps[1, 1].abs().sum()) == 0.0  # the empty slot


# ---- automatic target layer -------------------------------------------------------------

def test_auto_layer_is_the_norm_before_the_last_attention():
    x = torch.randn(1, 3, 32, 32)
    assert find_target_layer(vit(depth=3), x)[0] == "blocks.2.norm1"
    assert find_target_layer(vit(dims=3, in_ch=1), torch.randn(1, 1, 16, 16, 16))[0] == \
        "blocks.1.norm1"


def test_auto_layer_torchvision_transformers():
    vt = pytest.importorskip("torchvision.models.vision_transformer")
    torch.manual_seed(0)
    # nn.MultiheadAttention (it returns a tuple), no num_prefix_tokens attribute
    model = vt.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                 hidden_dim=16, mlp_dim=32, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    assert find_target_layer(model, x)[0] == "encoder.layers.encoder_layer_1.ln_1"
    res = explain_batch(model, x, "eigencam")
    assert res.heatmaps.shape == (2, 32, 32) and float(res.heatmaps.amax()) == 1.0
    with pytest.raises(ValueError, match=r"'encoder.layers.encoder_layer_1.self_attention' "
                                         r"returns a tuple, not a tensor; choose .*norm"):
        explain_batch(model, x, "gradcam", "encoder.layers.encoder_layer_1.self_attention")
    assert hooks_left(model) == 0


def test_attention_inside_a_cnn_keeps_the_last_convolution():
    """An attention block mid-network, convolutions after it: the CNN rule stands."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.norm = nn.LayerNorm(8)
            self.attn = Attention(8)
            self.conv = nn.Conv2d(8, 8, 3, padding=1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            f = self.stem(x)
            t = f.flatten(2).transpose(1, 2)
            t = t + self.attn(self.norm(t))
            f = t.transpose(1, 2).reshape(f.shape)
            return self.head(self.conv(f).mean((2, 3)))

    assert find_target_layer(Mixed().eval(), torch.randn(1, 3, 16, 16))[0] == "conv"


def test_auto_layer_is_never_a_segmentation_output():
    x = torch.randn(1, 1, 32, 32)
    plain = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 3, 1)).eval()
    assert find_target_layer(plain, x)[0] == "1"
    passed_on = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 1),
                              nn.Identity(), nn.Upsample(scale_factor=1.0),
                              nn.Sigmoid()).eval()
    assert find_target_layer(passed_on, x)[0] == "1"
    volume = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1),
                           nn.Softmax(1)).eval()
    assert find_target_layer(volume, torch.randn(1, 1, 8, 8, 8))[0] == "1"


def test_auto_layer_of_a_monai_unet():
    monai = pytest.importorskip("monai.networks.nets")
    unet = monai.UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32),
                      strides=(2, 2)).eval()
    name, _ = find_target_layer(unet, torch.randn(1, 1, 32, 32))
    assert name == "model.1"  # what the final convolution ("model.2") takes


@pytest.mark.parametrize("dims", [2, 3])
def test_auto_layer_of_a_monai_unet_with_residual_units(dims):
    # its head ("model.2") is an up-convolution then a ResidualUnit whose inner convolution
    # already makes the class maps: those inner steps explain the logits, so they are passed
    # over for what the head takes, as without residual units
    monai = pytest.importorskip("monai.networks.nets")
    unet = monai.UNet(spatial_dims=dims, in_channels=1, out_channels=3, channels=(4, 8, 16),
                      strides=(2, 2), num_res_units=2).eval()
    x = torch.randn((1, 1) + (16,) * dims)
    name, _ = find_target_layer(unet, x)
    assert name == "model.1"
    assert "model.2.1.conv" in spatial_layer_names(unet, x)  # still choosable by name


def test_auto_layer_keeps_the_old_rule_when_the_head_is_all_there_is():
    # everything runs inside the module making the output, at the output's shape: nothing
    # would be left, so the last map before the output stands
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(3, 3, 1))

        def forward(self, x):
            return self.net(x)

    assert find_target_layer(Wrapped().eval(), torch.randn(1, 3, 16, 16))[0] == "net.1"


def test_auto_layer_of_an_smp_unet():
    smp = pytest.importorskip("segmentation_models_pytorch")
    net = smp.Unet("resnet18", encoder_weights=None, classes=3,
                   decoder_channels=(32, 16, 8, 8, 8)).eval()
    x = torch.randn(1, 3, 64, 64)
    name, layer = find_target_layer(net, x)
    assert name.startswith("decoder")
    outs = {}
    h1 = layer.register_forward_hook(lambda m, i, o: outs.setdefault("ours", o))
    h2 = net.segmentation_head.register_forward_pre_hook(
        lambda m, i: outs.setdefault("head_in", i[0]))
    with torch.no_grad():
        net(x)
    h1.remove(), h2.remove()
    assert outs["ours"] is outs["head_in"]  # the decoder's last block, right before the head


def test_token_layers_are_listed_and_choosable_by_name():
    model = vit()
    x = torch.randn(1, 3, 32, 32)
    names = spatial_layer_names(model, x)
    assert {"blocks.1.norm1", "blocks.1", "norm"} <= set(names)
    for name in ("blocks.0", "blocks.1.attn", "norm"):
        res = explain_batch(model, x, "gradcam", name)
        assert res.heatmaps.shape == (1, 32, 32)
    with pytest.raises(ValueError, match=r"no layer named 'zzz'.*'blocks.1'"):
        explain_batch(model, x, "gradcam", "zzz")


# ---- refused with a reason --------------------------------------------------------------

class TokenMix(nn.Module):
    """Mixes 64 tokens into 45: (N, 64, C) -> (N, 45, C)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 45)

    def forward(self, t):
        return self.lin(t.transpose(1, 2)).transpose(1, 2)


class Squeezed(nn.Module):
    """A layer that outputs 45 tokens for a 32 x 32 input: no grid with any prefix."""

    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, 16, 4, stride=4)
        self.squeeze = TokenMix()
        self.head = nn.Linear(16, 3)
        self.num_prefix_tokens = 1

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, 64, C)
        return self.head(self.squeeze(t).mean(1))


def test_token_count_that_is_no_grid_names_layer_and_shape():
    model = Squeezed().eval()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"'squeeze'.*\(2, 45, 16\).*no patch grid.*32 x 32"):
        explain_batch(model, x, "gradcam", "squeeze")
    assert hooks_left(model) == 0
    assert all(p.grad is None for p in model.parameters())


def test_two_dimensional_outputs_are_refused():
    model = vit()
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"'head' outputs shape \(2, 3\), neither"):
        explain_batch(model, x, "gradcam", "head")


def test_tokens_without_the_batch_axis_are_refused():
    """Window attention folds windows into the batch axis: (N * windows, T, C)."""

    class Windowed(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.mix = nn.Linear(8, 8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            f = self.embed(x)  # (N, 8, 8, 8): four 4 x 4 windows
            w = f.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 4, 5, 1).reshape(-1, 16, 8)
            return self.head(self.mix(w).reshape(len(x), -1, 8).mean(1))

    with pytest.raises(ValueError, match=r"'mix' outputs shape \(8, 16, 8\)"):
        explain_batch(Windowed().eval(), torch.randn(2, 3, 32, 32), "gradcam", "mix")


def test_explain_arrays_on_a_loaded_timm_vit(tmp_path):
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    import napari_gradcam as ng

    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    path = tmp_path / "vit.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    spec = ng.load_model("timm:vit_tiny_patch16_224", weights=path)
    assert spec.input_size == (224, 224)
    cfg = ref.pretrained_cfg
    np.testing.assert_allclose(spec.mean, cfg["mean"])
    np.testing.assert_allclose(spec.std, cfg["std"])
    image = np.random.default_rng(0).integers(0, 255, (224, 224, 3), dtype=np.uint8)
    result = ng.explain(image, spec, device="cpu", channel_axis=-1)
    assert result.heatmaps.shape == (224, 224)
    assert result.target_layer == "blocks.11.norm1"
    assert np.isfinite(result.heatmaps).all() and result.heatmaps.max() == 1.0
    assert result.heatmaps.std() > 0.01
