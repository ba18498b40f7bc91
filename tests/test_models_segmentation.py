"""Segmentation networks and vision transformers by name: segmentation_models_pytorch
(``"smp:Unet"``), MONAI's ``UNet`` and timm's ViT / DeiT / Swin, with random weights saved at
test time; the class count read from the segmentation head; the ``output`` field; and the
arguments, names and files that must be refused before anything is built."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import napari_gradcam as ng
from napari_gradcam.models import _optional, loader

smp = pytest.importorskip("segmentation_models_pytorch")

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning",
                                        "ignore::DeprecationWarning")

# a U-Net with a resnet18 encoder cut to three stages: the smp layout in a few megabytes
SMALL = {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]}


def save(model: nn.Module, path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def unet(classes=3, in_channels=1, **extra) -> nn.Module:
    torch.manual_seed(0)
    return smp.Unet(**{**SMALL, **extra}, encoder_weights=None, classes=classes,
                    in_channels=in_channels).eval()


def same_outputs(a: nn.Module, b: nn.Module, shape) -> bool:
    x = torch.rand(shape)
    with torch.no_grad():
        ya, yb = a.eval()(x), b.eval()(x)
    ya, yb = (ya[0], yb[0]) if isinstance(ya, tuple) else (ya, yb)
    return torch.allclose(ya, yb, atol=1e-5)


@pytest.fixture(scope="module")
def unet3(tmp_path_factory):
    """A 3-class, 1-channel smp U-Net and its weights file."""
    model = unet()
    return model, save(model, tmp_path_factory.mktemp("smp") / "unet.safetensors")


def no_build(monkeypatch):
    """Make any smp build (and any read of a weights file) fail the test."""
    def fail(*_a, **_k):
        raise AssertionError("built or read something before refusing")
    monkeypatch.setattr(loader, "_from_smp", fail)
    monkeypatch.setattr(loader, "read_weights", fail)


# ---- smp ----------------------------------------------------------------------------------------

def test_smp_unet_classes_and_channels_from_the_weights(unet3):
    model, path = unet3
    spec = ng.load_model("smp:Unet", weights=path, arguments=SMALL)
    assert spec.class_names == ["class 0", "class 1", "class 2"]
    assert spec.in_channels == 1 and spec.input_size is None and spec.output is None
    assert spec.mean == (0.0,) and spec.std == (1.0,)  # ImageNet's would not fit one channel
    assert spec.extra["architecture"] == "smp:Unet"
    assert spec.module.encoder.conv1.in_channels == 1
    assert same_outputs(spec.module, model, (2, 1, 32, 32))
    # the class names are checked against the segmentation head
    with pytest.raises(ValueError, match="2 class names for a model with 3 outputs"):
        ng.load_model("smp:Unet", weights=path, arguments=SMALL, class_names=["a", "b"])


def test_smp_rgb_model_gets_imagenet_normalisation_and_case_insensitive_name(tmp_path):
    model = unet(classes=2, in_channels=3, encoder_name="resnet18")
    path = save(model, tmp_path / "rgb.safetensors")
    spec = ng.load_model("smp:unet", weights=path, arguments=SMALL)
    assert spec.mean == loader.IMAGENET_MEAN and spec.std == loader.IMAGENET_STD
    assert spec.in_channels == 3 and len(spec.class_names) == 2
    assert spec.extra["architecture"] == "smp:unet"


def test_smp_timm_encoder_takes_timms_normalisation(tmp_path):
    torch.manual_seed(0)
    arguments = {**SMALL, "encoder_name": "tu-mobilevit_xxs"}
    model = smp.Unet(**arguments, encoder_weights=None, classes=2).eval()
    path = save(model, tmp_path / "mvit.safetensors")
    spec = ng.load_model("smp:Unet", weights=path, arguments=arguments)
    # mobilevit was pretrained on unnormalised [0, 1] pixels, not ImageNet's statistics
    assert spec.mean == (0.0, 0.0, 0.0) and spec.std == (1.0, 1.0, 1.0)
    assert spec.in_channels == 3 and len(spec.class_names) == 2
    assert same_outputs(spec.module, model, (1, 3, 32, 32))


def test_smp_sidecar_with_output_and_encoder_weights_null(unet3, tmp_path):
    model, path = unet3
    weights = tmp_path / "cells.safetensors"
    weights.write_bytes(path.read_bytes())
    side = tmp_path / "cells.json"
    side.write_text(json.dumps({"architecture": "smp:Unet", "weights": weights.name,
                                "arguments": {**SMALL, "encoder_weights": None},
                                "class_names": ["background", "nucleus", "membrane"],
                                "output": "multilabel"}))
    spec = ng.load_model(side)
    assert spec.class_names == ["background", "nucleus", "membrane"]
    assert spec.output == "multilabel" and spec.name == "cells"
    assert same_outputs(spec.module, model, (1, 1, 32, 32))
    # the keyword goes over the sidecar; "sigmoid" is multilabel's other name
    assert ng.load_model(side, output="softmax").output == "softmax"
    assert ng.load_model(weights, output="Sigmoid").output == "multilabel"


def test_smp_activation_is_left_out_and_sets_the_output(unet3):
    model, path = unet3
    spec = ng.load_model("smp:Unet", weights=path, arguments={**SMALL, "activation": "sigmoid"})
    assert spec.output == "multilabel"
    assert same_outputs(spec.module, model, (1, 1, 32, 32))  # logits, not probabilities
    spec = ng.load_model("smp:Unet", weights=path,
                         arguments={**SMALL, "activation": "softmax2d"})
    assert spec.output == "softmax"
    with pytest.raises(ValueError, match=r"activation='tanh'.*leave it out.*output="):
        ng.load_model("smp:Unet", weights=path, arguments={**SMALL, "activation": "tanh"})


def test_smp_auxiliary_classifier_does_not_set_the_classes(tmp_path):
    model = unet(classes=2, aux_params={"classes": 5})
    path = save(model, tmp_path / "aux.safetensors")
    spec = ng.load_model("smp:Unet", weights=path,
                         arguments={**SMALL, "aux_params": {"classes": 5}})
    assert spec.class_names == ["class 0", "class 1"]
    assert same_outputs(spec.module, model, (1, 1, 32, 32))


def test_smp_other_architecture_fpn(tmp_path):
    torch.manual_seed(0)
    model = smp.FPN(encoder_name="resnet18", encoder_depth=3, encoder_weights=None, classes=4,
                    in_channels=2, decoder_pyramid_channels=16,
                    decoder_segmentation_channels=32, upsampling=2).eval()
    path = save(model, tmp_path / "fpn.safetensors")
    spec = ng.load_model("smp:FPN", weights=path, arguments={
        "encoder_name": "resnet18", "encoder_depth": 3, "decoder_pyramid_channels": 16,
        "decoder_segmentation_channels": 32, "upsampling": 2})
    assert len(spec.class_names) == 4 and spec.in_channels == 2
    assert same_outputs(spec.module, model, (1, 2, 32, 32))


@pytest.mark.parametrize("arguments, named", [
    ({"encoder_weights": "imagenet"}, "encoder_weights='imagenet'"),
    ({"encoder_name": "https://example.org/evil.pth"}, "encoder_name="),
    ({"decoder_attention_type": "/tmp/evil.pt"}, "decoder_attention_type="),
    ({"aux_params": {"weights_url": "x"}}, "aux_params="),
    ({"pretrained": True}, "pretrained=True"),
])
def test_smp_arguments_that_fetch_or_name_files_are_refused_first(
        unet3, monkeypatch, arguments, named):
    _model, path = unet3
    no_build(monkeypatch)
    with pytest.raises(ValueError, match=f"smp:Unet: {named}.*would download weights or read "
                                         "another file.*leave"):
        ng.load_model("smp:Unet", weights=path, arguments={**SMALL, **arguments})


def test_smp_sidecar_asking_for_pretrained_encoder_is_refused(unet3, tmp_path, monkeypatch):
    _model, path = unet3
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(path.read_bytes())
    data = weights.read_bytes()
    side = tmp_path / "w.safetensors.json"
    side.write_text(json.dumps({"architecture": "smp:Unet",
                                "arguments": {**SMALL, "encoder_weights": "imagenet"}}))
    monkeypatch.setattr(loader, "_from_smp", lambda *a, **k: pytest.fail("built"))
    with pytest.raises(ValueError, match="'encoder_weights'.*another file.*trust_code=True"):
        ng.load_model(weights)
    # trusting the file doesn't reach the network either
    with pytest.raises(ValueError, match="encoder_weights='imagenet' would download weights"):
        ng.load_model(weights, trust_code=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([side.name, weights.name])
    assert weights.read_bytes() == data


def test_smp_unknown_names_give_close_matches(unet3, monkeypatch):
    _model, path = unet3
    no_build(monkeypatch)
    with pytest.raises(ValueError, match=r"no architecture 'Unett'; did you mean 'smp:Unet'"):
        ng.load_model("smp:Unett", weights=path)
    with pytest.raises(ValueError, match=r"unknown encoder_name 'resnet19'; did you mean "
                                         r"'resnet18'"):
        ng.load_model("smp:Unet", weights=path, arguments={"encoder_name": "resnet19"})
    with pytest.raises(ValueError, match=r"unknown encoder_name 'tu-resnet1'.*'tu-resnet1"):
        ng.load_model("smp:Unet", weights=path, arguments={"encoder_name": "tu-resnet1"})
    with pytest.raises(ValueError, match=r"encoder_name must be an encoder's name.*not 3"):
        ng.load_model("smp:Unet", weights=path, arguments={"encoder_name": 3})
    with pytest.raises(ValueError, match=r"takes no argument 'encoder_dept' \(did you mean "
                                         r"'encoder_depth'\?\)"):
        ng.load_model("smp:Unet", weights=path, arguments={"encoder_dept": 3})
    # a plain name that smp has is suggested with its family
    with pytest.raises(ValueError, match=r"unknown architecture 'Linknet'.*'smp:Linknet'"):
        ng.load_model("Linknet", weights=path)


def test_smp_weights_that_do_not_fit(unet3, tmp_path):
    _model, path = unet3
    # another encoder: its layers are not the architecture's
    other = save(unet(encoder_name="mobilenet_v2"), tmp_path / "mobile.safetensors")
    with pytest.raises(ValueError, match=r"weights don't fit 'smp:Unet': missing keys: "
                                         r"encoder\.conv1\.weight.*unexpected keys: "
                                         r"encoder\.features.*Check the architecture name"):
        ng.load_model("smp:Unet", weights=other, arguments=SMALL)
    # classes given that the weights contradict
    with pytest.raises(ValueError, match=r"wrong shapes.*segmentation_head\.0\.weight "
                                         r"\(3, 4, 3, 3\) vs \(2, 4, 3, 3\)"):
        ng.load_model("smp:Unet", weights=path, arguments={**SMALL, "classes": 2})
    # arguments smp itself rejects: one sentence, no traceback from inside smp
    with pytest.raises(ValueError, match=r"can't build smp:Unet with arguments .*give the "
                                         "arguments the network was trained with"):
        ng.load_model("smp:Unet", weights=path, arguments={**SMALL, "encoder_depth": 9})


def test_smp_not_installed_names_the_extra(unet3, monkeypatch):
    _model, path = unet3
    real = _optional.import_library

    def missing(name):
        if name.partition(".")[0] == "segmentation_models_pytorch":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name)

    monkeypatch.setattr(_optional, "import_library", missing)
    monkeypatch.setattr(loader, "read_weights", lambda *a, **k: pytest.fail("read weights"))
    with pytest.raises(ValueError, match=r"'smp:Unet' needs the optional package "
                                         r"'segmentation_models_pytorch'.*napari-gradcam"
                                         r"\[segmentation\]"):
        ng.load_model("smp:Unet", weights=path, arguments=SMALL)


def test_output_values_are_checked(unet3, tmp_path):
    _model, path = unet3
    with pytest.raises(ValueError, match=r"load_model: output must be 'softmax'.*or "
                                         r"'multilabel'.*not 'probability'"):
        ng.load_model("smp:Unet", weights=path, arguments=SMALL, output="probability")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(path.read_bytes())
    (tmp_path / "w.safetensors.json").write_text(json.dumps(
        {"architecture": "smp:Unet", "arguments": SMALL, "output": 1}))
    with pytest.raises(ValueError, match=r"w\.safetensors\.json.*: output must be 'softmax'"):
        ng.load_model(weights)
    # a single output can't be a softmax
    one = save(unet(classes=1), tmp_path / "one.safetensors")
    spec = ng.load_model("smp:Unet", weights=one, arguments=SMALL)
    assert spec.class_names == ["class 0"] and spec.output is None
    with pytest.raises(ValueError, match="output='softmax' for a model with one output.*"
                                         "multilabel"):
        ng.load_model("smp:Unet", weights=one, arguments=SMALL, output="softmax")


# ---- MONAI's UNet -------------------------------------------------------------------------------

def test_monai_unet_classes_from_the_weights(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    arguments = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3,
                 "channels": [4, 8, 16], "strides": [2, 2]}
    for extra in ({}, {"num_res_units": 1}):
        torch.manual_seed(0)
        model = nets.UNet(**arguments, **extra).eval()
        path = save(model, tmp_path / "unet.safetensors")
        spec = ng.load_model("monai:UNet", weights=path, arguments={**arguments, **extra})
        assert spec.class_names == ["class 0", "class 1", "class 2"] and spec.in_channels == 1
        assert same_outputs(spec.module, model, (1, 1, 32, 32))
        # the shapes need not be repeated: channels, classes and spatial_dims from the weights
        shapes = {k: v for k, v in arguments.items() if k in ("channels", "strides")}
        spec = ng.load_model("monai:UNet", weights=path, arguments={**shapes, **extra})
        assert len(spec.class_names) == 3 and spec.in_channels == 1
        assert same_outputs(spec.module, model, (1, 1, 32, 32))


class _LinearFirst(nn.Module):
    """A classifier whose head is registered before its convolutions."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 3)
        self.features = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(8, 16, 3, padding=1))

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_classifier_head_registered_before_its_convolutions_sets_the_classes(tmp_path):
    # the last Linear is the class count, not the last convolution's 16 channels
    spec = ng.load_model(_LinearFirst())
    assert spec.class_names == ["class 0", "class 1", "class 2"] and spec.in_channels == 1
    spec = ng.load_model(_LinearFirst(), class_names=["a", "b", "c"])
    assert spec.class_names == ["a", "b", "c"]
    with pytest.raises(ValueError, match="4 class names for a model with 3 outputs"):
        ng.load_model(_LinearFirst(), class_names=["a", "b", "c", "d"])
    # a fully convolutional network (no Linear) still takes its last convolution
    squeeze = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 5, 1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert len(ng.load_model(squeeze).class_names) == 5


# ---- timm transformers --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224",
                                  "swin_tiny_patch4_window7_224"])
def test_timm_transformers_input_size_and_normalisation(name, tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    # the named layouts, narrowed and shortened: input size and normalisation are the name's
    kwargs = ({"depths": (1, 1, 1, 1), "embed_dim": 24} if name.startswith("swin")
              else {"depth": 1, "embed_dim": 48})
    model = timm.create_model(name, pretrained=False, num_classes=3, **kwargs).eval()
    path = save(model, tmp_path / "vit.safetensors")
    spec = ng.load_model(f"timm:{name}", weights=path, arguments=kwargs)
    cfg = model.pretrained_cfg
    assert spec.input_size == (224, 224) == tuple(cfg["input_size"][1:])
    assert spec.mean == tuple(cfg["mean"]) and spec.std == tuple(cfg["std"])
    assert spec.class_names == ["class 0", "class 1", "class 2"] and spec.in_channels == 3
    assert same_outputs(spec.module, model, (1, 3, 224, 224))
