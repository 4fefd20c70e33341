"""Output heads started at the class priors (medseg.nets.prior): the logits by hand, every head of
both registered networks set, a head without a bias refused, and which runs get it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.nets.prior import MIN_PRIOR, prior_logits, set_output_bias


def _softmax(x):
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def test_prior_logits_by_hand():
    logits = prior_logits([0.3, 0.1])
    # softmax gives back the priors 0.6, 0.3, 0.1; the logits are log-ratios, centred on 0
    np.testing.assert_allclose(_softmax(logits), [0.6, 0.3, 0.1], rtol=1e-12)
    assert logits[1] - logits[2] == pytest.approx(math.log(3.0))
    assert sum(logits) == pytest.approx(0.0, abs=1e-12)


def test_prior_logits_floor_an_absent_class_and_refuse_bad_fractions():
    p = _softmax(prior_logits([0.5, 0.0]))
    assert p[2] == pytest.approx(MIN_PRIOR / (1 + MIN_PRIOR)) and p[0] == pytest.approx(p[1])
    for bad in ([0.7, 0.5], [-0.1], [float("nan")], [], [[0.1]]):
        with pytest.raises(ValueError, match="class fractions"):
            prior_logits(bad)


@pytest.mark.parametrize("network", ["unetpp", "unet"])
def test_every_head_of_the_registered_networks_starts_at_the_priors(network):
    from medseg.nets.registry import NetworkSpec

    spec = NetworkSpec.from_settings(network, filters=[4, 8, 16], depth=2)
    model = spec.build(1, 3)
    bias = prior_logits([0.2, 0.05])
    changed = set_output_bias(model, bias)
    assert len(changed) == len(model.output_names) == (2 if network == "unetpp" else 1)
    # with the 1x1 kernels zeroed every pixel's softmax is the priors, whatever the image
    for name in changed:
        layer = model.get_layer(name)
        np.testing.assert_allclose(layer.bias.numpy(), bias, rtol=1e-6)
        layer.kernel.assign(np.zeros(layer.kernel.shape, np.float32))
    outputs = model(np.random.default_rng(0).random((2, 16, 16, 1), dtype=np.float32))
    for out in (outputs if isinstance(outputs, (list, tuple)) else [outputs]):
        np.testing.assert_allclose(np.asarray(out)[..., :].reshape(-1, 3), np.tile([0.75, 0.2, 0.05], (512, 1)),
                                   rtol=1e-5)


def test_a_head_without_a_bias_is_refused():
    import keras

    x = keras.Input((8, 8, 1))
    y = keras.layers.Conv2D(3, 1, use_bias=False, name="logits")(x)
    model = keras.Model(x, keras.layers.Activation("softmax", name="probs")(y))
    with pytest.raises(ValueError, match=r"output 'probs'.*bias of 3 values"):
        set_output_bias(model, prior_logits([0.1, 0.1]))
    with pytest.raises(ValueError, match="bias of 2 values"):
        set_output_bias(keras.Model(x, keras.layers.Conv2D(3, 1, activation="softmax", name="out")(x)), [0.0, 0.0])


def test_which_runs_start_at_the_priors():
    from test_class_balance import REGIONS, _class_plan, _ct_pair

    from medseg.data.plan import make_plan
    from medseg.train.assembly import output_bias_for

    plan = _class_plan()
    assert output_bias_for(plan) == pytest.approx(prior_logits([1000 / 9000, 90 / 9000]))
    assert output_bias_for(make_plan([_ct_pair()])) is None                       # binary: as built
    regions = plan.replace(classes=REGIONS.to_dict(), num_classes=REGIONS.num_classes, enhancement=None,
                           contrast_phases=None)
    assert output_bias_for(regions) is None                                       # sigmoid regions
    old = plan.replace(fingerprint={k: v for k, v in plan.fingerprint.items() if k != "class_body_fractions"})
    assert output_bias_for(old) is None                                           # fitted before the shares
