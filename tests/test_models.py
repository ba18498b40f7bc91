"""load_model: torchvision / timm / factory architectures with weights files, sidecars,
torch.export programs, and every way a model file can be wrong (pickles run nothing)."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import napari_gradcam as ng
from napari_gradcam.models.loader import IMAGENET_MEAN, IMAGENET_STD, read_weights

torchvision = pytest.importorskip("torchvision")

DATA = Path(__file__).parent / "data" / "chest-xray"


def same_outputs(a, b, in_ch=3, size=64):
    x = torch.randn(2, in_ch, size, size)
    with torch.no_grad():
        return torch.allclose(a.eval()(x), b.eval()(x), atol=1e-5)


def save(state, path: Path):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


def tv(arch, **kw):
    return torchvision.models.get_model(arch, weights=None, **kw).eval()


@pytest.mark.parametrize("arch,suffix", [("resnet18", ".pt"), ("densenet121", ".safetensors"),
                                         ("efficientnet_b0", ".pth")])
def test_torchvision_round_trip_reads_classes_from_the_weights(arch, suffix, tmp_path):
    model = tv(arch, num_classes=2)
    path = save(model.state_dict(), tmp_path / f"w{suffix}")
    spec = ng.load_model(arch, weights=path)
    assert same_outputs(model, spec.module)
    assert spec.class_names == ["class 0", "class 1"] and spec.in_channels == 3
    assert spec.mean == IMAGENET_MEAN and spec.std == IMAGENET_STD  # torchvision's convention
    assert not spec.module.training and spec.extra["architecture"] == arch


def test_grey_input_channels_are_read_from_the_first_convolution(tmp_path):
    model = tv("resnet18", num_classes=3)
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    path = save(model.state_dict(), tmp_path / "grey.safetensors")
    spec = ng.load_model("torchvision:resnet18", weights=path)
    assert spec.in_channels == 1 and spec.mean == (0.0,)
    assert same_outputs(model, spec.module, in_ch=1)


def test_checkpoint_dicts_and_wrapper_prefixes(tmp_path):
    model = tv("resnet18", num_classes=4)
    wrapped = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in
                                          model.state_dict().items()}}
    path = save(wrapped, tmp_path / "checkpoint.ckpt")
    spec = ng.load_model("resnet18", weights=path)
    assert same_outputs(model, spec.module) and len(spec.class_names) == 4


def test_sidecar_next_to_the_weights_and_the_json_itself(tmp_path):
    model = tv("resnet18", num_classes=2)
    path = save(model.state_dict(), tmp_path / "tb.safetensors")
    meta = {"architecture": "resnet18", "class_names": ["normal", "tuberculosis"],
            "input_size": [224, 224], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
            "target_layer": "layer3", "intensity": "minmax", "name": "TB classifier"}
    (tmp_path / "tb.safetensors.json").write_text(json.dumps(meta))
    spec = ng.load_model(path)  # picking one file is enough
    assert spec.class_names == ["normal", "tuberculosis"] and spec.input_size == (224, 224)
    assert spec.mean == (0.5,) * 3 and spec.std == (0.25,) * 3 and spec.target_layer == "layer3"
    assert spec.intensity == "minmax" and spec.name == "TB classifier"
    assert same_outputs(model, spec.module)
    # keywords override the sidecar
    spec = ng.load_model(path, class_names=["a", "b"], target_layer="layer4")
    assert spec.class_names == ["a", "b"] and spec.target_layer == "layer4"
    # model.json in the folder, and the JSON opened itself (its weights relative to it)
    folder = tmp_path / "release"
    folder.mkdir()
    save(model.state_dict(), folder / "weights.pth")
    (folder / "model.json").write_text(json.dumps(dict(meta, weights="weights.pth")))
    for source in (folder / "weights.pth", folder / "model.json"):
        spec = ng.load_model(source)
        assert spec.class_names == ["normal", "tuberculosis"]
        assert same_outputs(model, spec.module)


def test_timm_architectures(tmp_path):
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet10t", pretrained=False, num_classes=2, in_chans=1).eval()
    path = save(model.state_dict(), tmp_path / "timm.safetensors")
    spec = ng.load_model("timm:resnet10t", weights=path)
    assert spec.in_channels == 1 and len(spec.class_names) == 2
    assert same_outputs(model, spec.module, in_ch=1)
    # a plain name torchvision doesn't have is looked up in timm
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=3).eval()
    path = save(model.state_dict(), tmp_path / "convnext.pth")
    spec = ng.load_model("convnext_atto", weights=path)
    assert same_outputs(model, spec.module) and spec.mean == tuple(
        model.pretrained_cfg["mean"])
    exp = ng.explain(np.random.default_rng(0).random((64, 64, 3), dtype=np.float32), spec)
    assert exp.heatmaps.shape == (64, 64) and np.isfinite(exp.heatmaps).all()


def test_missing_timm_is_named(monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(ValueError, match="optional package 'timm'.*pip install timm"):
        ng.load_model("timm:resnet10t", weights=tmp_path / "w.pt")


def test_a_users_own_factory_with_arguments(tmp_path):
    from conftest import small_cnn

    model = small_cnn(in_ch=2, classes=5, width=6)
    path = save(model.state_dict(), tmp_path / "mine.pt")
    (tmp_path / "mine.pt.json").write_text(json.dumps({
        "architecture": "conftest:small_cnn", "arguments": {"in_ch": 2, "classes": 5, "width": 6},
        "class_names": list("abcde")}))
    # a callable named by a file runs only when the user trusts the file ...
    with pytest.raises(ValueError, match="'conftest:small_cnn'.*trust_code=True"):
        ng.load_model(path)
    spec = ng.load_model(path, trust_code=True)
    assert spec.in_channels == 2 and spec.class_names == list("abcde")
    assert same_outputs(model, spec.module, in_ch=2)
    # ... while the one the user types is their own code
    plain = save(small_cnn().state_dict(), tmp_path / "plain.pt")
    assert ng.load_model("conftest:small_cnn", weights=plain).in_channels == 1
    with pytest.raises(ValueError, match="has no callable 'nope'"):
        ng.load_model("conftest:nope", weights=path)
    with pytest.raises(ValueError, match="can't import 'no_such_pkg.models'"):
        ng.load_model("no_such_pkg.models:net", weights=path)


def test_a_module_with_weights_and_a_modelspec_are_sources(tmp_path):
    model = tv("resnet18", num_classes=2)
    path = save(model.state_dict(), tmp_path / "w.pt")
    spec = ng.load_model(tv("resnet18", num_classes=2), weights=path, class_names=["x", "y"])
    assert same_outputs(model, spec.module) and spec.class_names == ["x", "y"]
    again = ng.load_model(spec, target_layer="layer3")
    assert again.module is spec.module and again.target_layer == "layer3"
    assert spec.target_layer is None  # the original is left alone


# ---- unsafe and broken files -------------------------------------------------------------------

class Payload:
    """Unpickling this creates a file: code execution, in the smallest form."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("fmt", ["torch", "pickle"])
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_a_crafted_pickle_runs_nothing_unless_trusted(fmt, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    if fmt == "torch":
        torch.save({"weight": torch.zeros(1), "x": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"x": Payload(marker)}))
    assert not marker.exists()
    for source in (path, "resnet18"):
        with pytest.raises(ValueError, match="pickled Python objects.*trust_code=True"):
            ng.load_model(source, **({} if source == path else {"weights": path}))
        assert not marker.exists()
    if fmt == "torch":  # the explicit opt-in does unpickle (and finds no model in it)
        with pytest.raises(ValueError):
            ng.load_model(path, trust_code=True)
        assert marker.exists()


def test_a_pickled_whole_module_needs_trust(tmp_path):
    model = tv("resnet18", num_classes=2)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.raises(ValueError, match="trust_code=True.*--trust-code.*trust code in model"):
        ng.load_model(path)
    spec = ng.load_model(path, trust_code=True, class_names=["a", "b"])
    assert same_outputs(model, spec.module)


def test_trust_pickle_is_the_deprecated_name_of_trust_code(tmp_path):
    model = tv("resnet18", num_classes=2)
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    with pytest.warns(DeprecationWarning, match="trust_code"):
        spec = ng.load_model(path, trust_pickle=True)
    assert same_outputs(model, spec.module)
    with pytest.warns(DeprecationWarning, match="trust_code"):
        assert isinstance(read_weights(path, trust_pickle=True), torch.nn.Module)
    with pytest.raises(TypeError, match="trust_code=True and trust_pickle=False"):
        ng.load_model(path, trust_code=True, trust_pickle=False)


def test_torchscript_is_refused_with_the_formats_that_work(tmp_path):
    import warnings

    model = tv("resnet18", num_classes=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(model, torch.randn(1, 3, 64, 64))
    path = tmp_path / "scripted.pt"
    scripted.save(str(path))
    with pytest.raises(ValueError, match="TorchScript.*state dict.*torch.export"):
        ng.load_model(path)
    with pytest.raises(TypeError, match="TorchScript"):
        ng.load_model(scripted)


def test_torch_export_programs_are_hooked_through_unflatten(tmp_path):
    model = tv("resnet18", num_classes=2)
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "exported.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    spec = ng.load_model(path, class_names=["a", "b"])
    assert spec.input_size == (64, 64) and spec.extra["fixed_batch"] == 1
    assert spec.in_channels == 3
    images = np.random.default_rng(0).random((3, 80, 80, 3), dtype=np.float32)
    exp = ng.explain(images, spec, target_layer="layer4", batch_size=2)
    ref = ng.explain(images, ng.load_model(model, input_size=(64, 64)), target_layer="layer4")
    np.testing.assert_allclose(exp.heatmaps, ref.heatmaps, atol=1e-4)
    np.testing.assert_array_equal(exp.class_ids, ref.class_ids)
    # a program exported with a dynamic batch takes any batch size
    dyn = tmp_path / "dynamic.pt2"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 64, 64),),
                                          dynamic_shapes={"x": {0: batch}}), str(dyn))
    spec = ng.load_model(dyn)
    assert "fixed_batch" not in spec.extra
    np.testing.assert_allclose(ng.explain(images, spec, target_layer="layer4").heatmaps,
                               ref.heatmaps, atol=1e-4)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_corrupt_and_truncated_files(suffix, tmp_path):
    model = tv("resnet18", num_classes=2)
    good = save(model.state_dict(), tmp_path / f"good{suffix}")
    data = good.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: len(data) // 3])
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"this is not a model" * 10)
    for bad in (cut, junk):
        with pytest.raises(ValueError, match="truncated or corrupt|corrupt or another format"):
            ng.load_model("resnet18", weights=bad)


def test_weights_that_do_not_fit_say_which_keys(tmp_path):
    path = save(tv("resnet18", num_classes=2).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError, match=r"don't fit 'resnet34'.*missing keys: layer1\.2\."):
        ng.load_model("resnet34", weights=path)
    dense = save(tv("densenet121", num_classes=2).state_dict(), tmp_path / "d.pt")
    with pytest.raises(ValueError, match="missing keys: conv1.weight.*unexpected keys: features"):
        ng.load_model("resnet18", weights=dense)


def test_other_mistakes_say_what_to_do(tmp_path):
    path = save(tv("resnet18", num_classes=2).state_dict(), tmp_path / "r18.safetensors")
    with pytest.raises(ValueError, match="one name per output"):
        ng.load_model("resnet18", weights=path, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="unknown architecture 'resnet181'.*'resnet18'"):
        ng.load_model("resnet181", weights=path)
    with pytest.raises(ValueError, match="randomly initialised"):
        ng.load_model("resnet18")
    with pytest.raises(ValueError, match="nothing says which architecture.*r18.safetensors.json"):
        ng.load_model(path)
    (tmp_path / "r18.safetensors.json").write_text(json.dumps({"architecture": "resnet18",
                                                                "class_name": ["a", "b"]}))
    with pytest.raises(ValueError, match="unknown field.*'class_name'.*'class_names'"):
        ng.load_model(path)
    (tmp_path / "r18.safetensors.json").write_text("{not json")
    with pytest.raises(ValueError, match="can't read the model description"):
        ng.load_model(path)
    (tmp_path / "r18.safetensors.json").unlink()
    with pytest.raises(ValueError, match="no layer 'layer5'.*'layer4'"):
        ng.load_model("resnet18", weights=path, target_layer="layer5")
    with pytest.raises(ValueError, match="mean has 2"):
        ng.load_model("resnet18", weights=path, mean=[0.1, 0.2])
    with pytest.raises(ValueError, match="intensity must be one of .* not 'sideways'"):
        ng.load_model("resnet18", weights=path, intensity="sideways")
    with pytest.raises(ValueError, match="does not exist"):
        ng.load_model(tmp_path / "missing.safetensors")


# ---- real radiographs through an ImageNet-style model --------------------------------------

def test_chest_xray_palette_png_through_a_three_channel_imagenet_model(tmp_path):
    import imageio.v3 as iio
    from PIL import Image

    png = DATA / "images" / "CHNCXR_0628_1.png"
    assert Image.open(png).mode == "P"  # palette indices are not intensities
    xray = iio.imread(png)  # decoded through the palette: (512, 512, 3) uint8 grey
    assert xray.shape == (512, 512, 3) and (xray[..., 0] == xray[..., 2]).all()
    lungs = iio.imread(DATA / "lung-masks" / png.name) > 127
    # the decoded grey levels are intensities: lungs (air) darker than the mediastinum
    assert xray[..., 0][lungs].mean() < xray[..., 0][:, 230:280].mean()

    model = tv("resnet18", num_classes=2)
    weights = save(model.state_dict(), tmp_path / "tb.safetensors")
    (tmp_path / "tb.safetensors.json").write_text(json.dumps(
        {"architecture": "resnet18", "class_names": ["normal", "tuberculosis"],
         "input_size": [224, 224]}))
    spec = ng.load_model(weights)
    exp = ng.explain(xray, spec, target="tuberculosis")
    assert exp.heatmaps.shape == (512, 512) and exp.class_ids == 1
    assert np.isfinite(exp.heatmaps).all() and exp.heatmaps.max() > 0.95

    # the same numbers by hand: /255, ImageNet mean/std, antialiased resize, CAM, resize back
    x = torch.from_numpy(xray).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None,
                                                                                    None]
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear",
                                        align_corners=False, antialias=True)
    res = ng.explain_batch(model, x, "gradcam", targets=1)
    back = torch.nn.functional.interpolate(res.heatmaps[:, None], size=(512, 512),
                                           mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(exp.heatmaps, back.clamp(0, 1).numpy(), atol=1e-4)
    regions = ng.find_regions(exp.heatmaps, 0.5, mask=lungs)
    assert all(lungs[r.bbox[0]:r.bbox[2], r.bbox[1]:r.bbox[3]].any() for r in regions)

    # all five radiographs, as one stack, each with its own lung mask
    names = sorted(p.name for p in (DATA / "images").glob("*.png"))
    assert len(names) == 5
    stack = np.stack([iio.imread(DATA / "images" / n) for n in names])
    masks = np.stack([iio.imread(DATA / "lung-masks" / n) > 127 for n in names])
    exp = ng.explain(stack, spec, batch_size=2)
    assert exp.heatmaps.shape == (5, 512, 512) and exp.class_ids.shape == (5,)
    for k in range(5):
        np.testing.assert_allclose(exp.heatmaps[k], ng.explain(stack[k], spec).heatmaps,
                                   atol=1e-5)
    regions = ng.find_regions(exp.heatmaps, "otsu", mask=masks)
    assert {r.index[0] for r in regions} == set(range(5))


def test_the_readme_documents_every_sidecar_field_and_its_example_loads(tmp_path):
    import re

    from napari_gradcam.models import SIDECAR_FIELDS
    from napari_gradcam.models.loader import read_sidecar

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    example = re.search(r"```json\n(.*?)```", readme, re.DOTALL).group(1)
    (tmp_path / "model.json").write_text(example)
    meta = read_sidecar(tmp_path / "model.json")
    assert meta["architecture"] == "densenet121"
    # the sidecar table is in the "Your own model" section (other sections have tables too)
    section = readme.split("\n## Your own model", 1)[1].split("\n## ", 1)[0]
    table = set(re.findall(r"^\| `(\w+)`(?:, `(\w+)`)? \|", section, re.MULTILINE))
    documented = {name for row in table for name in row if name}
    assert documented == set(SIDECAR_FIELDS)
    # and it describes a loadable model
    model = tv("densenet121", num_classes=2)
    save(model.state_dict(), tmp_path / "weights.safetensors")
    spec = ng.load_model(tmp_path / "weights.safetensors")
    assert spec.class_names == ["normal", "tuberculosis"] and spec.input_size == (224, 224)
    assert spec.target_layer == "features.denseblock4"


def test_first_conv_and_the_torchscript_refusal_are_one_function_each():
    from torch import nn

    from napari_gradcam.explain_arrays import is_grey_rgb, model_spatial_dims
    from napari_gradcam.models.spec import first_conv, refuse_torchscript

    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Conv3d(2, 4, 3)), nn.Conv2d(4, 4, 1))
    name, conv = first_conv(net)
    assert name == "1.0" and isinstance(conv, nn.Conv3d) and model_spatial_dims(net) == 3
    assert first_conv(nn.Linear(2, 2)) == (None, None)
    refuse_torchscript(net)  # a Python module passes
    with pytest.raises(TypeError, match="TorchScript.*state dict.*torch.export"):
        refuse_torchscript(torch.jit.script(nn.Conv2d(1, 1, 1)))
    grey = np.repeat(np.arange(12).reshape(3, 4, 1), 3, -1)
    assert is_grey_rgb(grey) and is_grey_rgb(torch.from_numpy(grey).permute(2, 0, 1), axis=0)
    grey[0, 0, 2] += 1
    assert not is_grey_rgb(grey)
