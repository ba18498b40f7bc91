"""Hand-computed maps on tiny models, one per method (captum's style: values, not shapes).

The activations are a 2-channel 2 x 2 map chosen by hand; the input is the activation itself
(an identity target layer), so no upsampling is involved and every number below can be checked
with pencil and paper.

    A0 = [[1, 2],      A1 = [[0, 1],        sum A0 = 4, sum A1 = 3
          [0, 1]]            [2, 0]]
    G0 = [[ 1, 1],     G1 = [[0, -1],       (gradient of class 0 with respect to A)
          [-1, 2]]           [3,  3]]
"""

import math

import pytest
import torch
from conftest import FlatHead, GapHead

import napari_gradcam as ng
from napari_gradcam.cam.methods import eigen_projection

A = torch.tensor([[[1.0, 2.0], [0.0, 1.0]], [[0.0, 1.0], [2.0, 0.0]]])
G = torch.tensor([[[1.0, 1.0], [-1.0, 2.0]], [[0.0, -1.0], [3.0, 3.0]]])
# class 1's gradient: anything else, so that the test also checks the class is picked right
V = torch.stack([G, -G.flip(-1)])


def run(method, model=None, x=None, targets=(0,)):
    model = model if model is not None else FlatHead(V)
    x = A[None] if x is None else x
    out = ng.explain_batch(model, x, method, target_layer="features", targets=list(targets))
    return out.heatmaps[0]


def check(method, expected, **kw):
    got = run(method, **kw)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)


def test_gradcam():
    # w = mean G = (3/4, 5/4); cam = .75 A0 + 1.25 A1 = [[.75, 2.75], [2.5, .75]]
    # min-max: (cam - .75) / 2
    check("gradcam", [[0.0, 1.0], [0.875, 0.0]])


def test_hirescam():
    # G0*A0 = [[1, 2], [0, 2]], G1*A1 = [[0, -1], [6, 0]]; sum = [[1, 1], [6, 2]]
    # min-max: (x - 1) / 5
    check("hirescam", [[0.0, 0.0], [1.0, 0.2]])


def test_layercam():
    # relu(G0)*A0 = [[1, 2], [0, 2]], relu(G1)*A1 = [[0, 0], [6, 0]]; sum = [[1, 2], [6, 2]]
    check("layercam", [[0.0, 0.2], [1.0, 0.2]])


def test_xgradcam():
    # w0 = sum(G0 A0) / sum A0 = 5/4, w1 = sum(G1 A1) / sum A1 = 5/3
    # cam = [[5/4, 5/2 + 5/3], [10/3, 5/4]]; min-max: (10/3 - 5/4) / (25/6 - 5/4) = 5/7
    check("xgradcam", [[0.0, 1.0], [5 / 7, 0.0]])


def test_gradcam_plus_plus():
    # alpha = G^2 / (2 G^2 + sum(A) G^3), 0 where G = 0; w = sum relu(G) alpha
    # channel 0 (sum 4): G=1 -> 1/6, G=2 -> 4/40 = 1/10; w0 = 1/6 + 1/6 + 2/10 = 8/15
    # channel 1 (sum 3): G=3 -> 9/99 = 1/11 (twice); w1 = 3/11 + 3/11 = 6/11
    # cam = [[8/15, 16/15 + 6/11], [12/11, 8/15]]; min-max at (1, 0): 46/89
    check("gradcam++", [[0.0, 1.0], [46 / 89, 0.0]])


def test_explains_the_requested_class():
    # class 1's gradient is -G mirrored: Grad-CAM weights (-3/4, -5/4) -> all negative -> flat
    got = run("gradcam", targets=(1,))
    assert torch.count_nonzero(got) == 0
    got = run("hirescam", targets=(1,))
    # -G.flip * A: ch0 [[-1, -1], [-2, 1]] * A0 = [[-1, -2], [0, 1]]; ch1 [[1, 0], [-3, -3]] * A1
    # = [[0, 0], [-6, 0]]; sum = [[-1, -2], [-6, 1]] -> relu -> only (1, 1) survives
    torch.testing.assert_close(got, torch.tensor([[0.0, 0.0], [0.0, 1.0]]))


def test_cam():
    # GAP + Linear head, W[0] = (2, -1): CAM = 2 A0 - A1 = [[2, 3], [-2, 2]] -> relu -> / 3
    W = torch.tensor([[2.0, -1.0], [0.5, 0.5]])
    check("cam", [[2 / 3, 1.0], [0.0, 2 / 3]], model=GapHead(W, torch.tensor([0.3, -0.2])))


def test_scorecam():
    # masks: M0 = minmax(A0) = [[.5, 1], [0, .5]], M1 = minmax(A1) = [[0, .5], [1, 0]]
    # head: GAP + Linear(2 -> 1, weights (1, 1)): logit(x * M_k) = mean((A0 + A1) * M_k), A0 + A1 = [[1, 3], [2, 1]]
    # k=0: (.5 + 3 + 0 + .5) / 4 = 1; k=1: (0 + 1.5 + 2 + 0) / 4 = .875
    # w = softmax(1, .875): w0 = 1 / (1 + e^-.125); cam = w0 A0 + w1 A1
    # min-max: (2 w1 - w0) / (w0 + w1) = 2 w1 - w0
    W = torch.tensor([[1.0, 1.0]])
    w0 = 1 / (1 + math.exp(-0.125))
    check("scorecam", [[0.0, 1.0], [2 * (1 - w0) - w0, 0.0]], model=GapHead(W))


def test_eigencam():
    # rank one: A0 = m, A1 = 2 m; centred m = [[-2.5, .5], [-.5, 2.5]] is the first component;
    # the sign agrees with the channel mean, so the map is relu(m - 3.5) / 2.5
    m = torch.tensor([[1.0, 4.0], [3.0, 6.0]])
    x = torch.stack([m, 2 * m])[None]
    check("eigencam", [[0.0, 0.2], [0.0, 1.0]], x=x, targets=(0,))
    # inverted contrast: the channel mean now follows -m, so the sign flips with it
    x = torch.stack([10 - m, 2 * (10 - m)])[None]
    check("eigencam", [[1.0, 0.0], [0.2, 0.0]], x=x, targets=(0,))


def test_eigen_projection_is_the_first_principal_component():
    m = torch.tensor([[1.0, 4.0], [3.0, 6.0]])
    proj = eigen_projection(torch.stack([m, 2 * m])[None])[0]
    # |u| = sqrt(5): projection of the centred rows on u / |u|
    torch.testing.assert_close(proj, (m - 3.5) * math.sqrt(5))


@pytest.mark.parametrize("method", ng.available_methods())
def test_every_method_has_a_golden_test(method):
    names = {n[len("test_"):].replace("_plus_plus", "++") for n in globals() if n.startswith("test_")}
    assert method in names
