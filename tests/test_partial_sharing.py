"""FedBN / SiloBN and FedPer (METHODS.md): private parameters never appear in any upload,
the shared ones are averaged, and each site ends with a personal model of its own."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from medfed.client import LocalData, LocalTraining, local_sgd_update
from medfed.client.drift import scaffold_update
from medfed.client.local import fedsgd_gradient
from medfed.client.sharing import PrivateState, keep_private, personalize_private
from medfed.comm import UploadBoundary
from medfed.comm.policy import SharingViolation
from medfed.engine import FederatedAlgorithm, run_federated
from medfed.errors import ConfigError
from medfed.experiments.config import TrainingSpec
from medfed.methods.images import IMAGE_METHODS
from medfed.methods.method import context_for
from medfed.models import LogisticRegression
from medfed.models.registry import is_head, is_norm, is_norm_statistic, make_model
from medfed.rng import KeyedRng
from medfed.server import apply_delta, chain, weighted_mean

SHAPE = (1, 8, 8)
SPECS = {spec.name: spec for spec in IMAGE_METHODS}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _sites(sizes=(16, 12, 10)):
    """Tiny images; each site has its own scanner (intensity scale and offset), so local
    normalization statistics differ from site to site."""
    sites = []
    for k, n in enumerate(sizes):
        rng = np.random.default_rng(20 + k)
        y = (np.arange(n) % 2).astype(np.float64)
        X = rng.normal(size=(n, *SHAPE)).astype(np.float32)
        X[y == 1, :, :4] += 1.0
        sites.append(LocalData(f"site-{k}", X * (1.0 + 0.5 * k) + 0.7 * k, y))
    return sites


class Spy:
    """An upload transform that records what each site hands to the boundary."""

    def __init__(self):
        self.uploads = []

    def __call__(self, upload):
        self.uploads.append(upload)
        return upload


def _run(algorithm, rounds=3, model=None, sites=None, spy=None):
    model = model or make_model("cnn2d", SHAPE, channels=(4, 8))
    sites = sites or _sites()
    training = LocalTraining(model, 0.1, 3, 8, 1e-3)
    init = model.init_params(SHAPE, KeyedRng(0))
    boundary = UploadBoundary([spy]) if spy is not None else None
    return init, run_federated(algorithm, init, sites, training, rounds, KeyedRng(1), boundary=boundary)


def _build(name, **opts):
    return SPECS[name].build(SPECS[name].validate(opts), TrainingSpec(), context_for(["site-0", "site-1", "site-2"]))


@pytest.mark.parametrize("local_affine", [True, False])
def test_fedbn_never_uploads_normalization_statistics(local_affine):
    spy = Spy()
    init, run = _run(_build("fedbn", local_affine=local_affine), spy=spy)
    private = is_norm if local_affine else is_norm_statistic
    shared = {k for k in init if not private(k)}
    assert len(spy.uploads) == 9
    for upload in spy.uploads:
        assert not any(is_norm_statistic(k) for k in upload.payload)
        assert set(upload.payload) == shared
        affine = {k for k in upload.payload if is_norm(k)}
        assert bool(affine) == (not local_affine)  # SiloBN shares the affine terms, FedBN does not
    for k in init:
        if private(k):  # the server's copy of a private parameter never moves
            np.testing.assert_array_equal(run.params[k], init[k])
        elif k.endswith("conv.weight") or (not local_affine and is_norm(k)):
            assert not np.array_equal(run.params[k], init[k])
    # each site trained its own statistics
    stats = [k for k in init if is_norm_statistic(k)]
    own = [run.client_states[s].private for s in ("site-0", "site-1", "site-2")]
    for a in own:
        assert set(a) == {k for k in init if private(k)}
        assert all(not np.array_equal(a[k], init[k]) for k in stats)
    assert not np.allclose(own[0][stats[0]], own[2][stats[0]])


def test_fedbn_personal_models_are_the_global_shared_part_with_each_sites_own_norm_layers():
    _, run = _run(_build("fedbn"))
    sites = _sites()
    model = make_model("cnn2d", SHAPE, channels=(4, 8))
    predictions = []
    for site in sites:
        personal = run.personal[site.name]
        for k, v in personal.items():
            if is_norm_statistic(k):
                continue  # recomputed on the site's rows under the final weights (below)
            expected = run.client_states[site.name].private[k] if is_norm(k) else run.params[k]
            np.testing.assert_array_equal(v, expected)
        recalibrated = model.recalibrate({**personal}, site.X)
        for k in personal:
            if is_norm_statistic(k):
                np.testing.assert_array_equal(personal[k], recalibrated[k])
        predictions.append(model.predict_proba(personal, sites[0].X))
    assert not np.allclose(predictions[0], predictions[1]) and not np.allclose(predictions[1], predictions[2])


def test_fedper_never_uploads_the_head_and_averages_the_body():
    spy = Spy()
    sites = _sites()
    init, run = _run(_build("fedper"), rounds=1, spy=spy, sites=sites)
    assert len(spy.uploads) == 3
    for upload in spy.uploads:
        assert set(upload.payload) == {k for k in init if not is_head(k)}
    weights = np.array([s.n for s in sites], dtype=np.float64) / sum(s.n for s in sites)
    for k in init:
        if is_head(k):
            np.testing.assert_array_equal(run.params[k], init[k])
        else:  # FedAvg on the body: the example-weighted mean of the sites' deltas
            mean = sum(w * u.payload[k] for w, u in zip(weights, spy.uploads))
            np.testing.assert_allclose(run.params[k], init[k] + mean, rtol=0, atol=1e-12)
    heads = [run.personal[s.name]["head.weight"] for s in sites]
    assert not np.allclose(heads[0], heads[1]) and not np.allclose(heads[1], heads[2])
    for s in sites:
        for k in init:
            if not is_head(k) and not is_norm_statistic(k):  # statistics: recomputed on the site's rows
                np.testing.assert_array_equal(run.personal[s.name][k], run.params[k])


@pytest.mark.parametrize("method", ["fedbn", "fedper"])
def test_results_do_not_depend_on_the_order_of_the_sites(method):
    sites = _sites()
    _, forward = _run(_build(method), sites=sites)
    _, backward = _run(_build(method), sites=sites[::-1])
    for k in forward.params:
        np.testing.assert_allclose(forward.params[k], backward.params[k], rtol=0, atol=1e-6)
    for s in sites:
        for k in forward.params:
            np.testing.assert_allclose(forward.personal[s.name][k], backward.personal[s.name][k], rtol=0, atol=1e-6)


def test_without_the_wrapper_the_boundary_refuses_the_upload():
    """The property is not vacuous: a plain FedAvg client would leak the statistics."""
    leaky = FederatedAlgorithm("leaky", local_sgd_update, chain(weighted_mean(), apply_delta()), private=is_norm_statistic)
    with pytest.raises(SharingViolation, match="running_mean"):
        _run(leaky, rounds=1)


def test_a_site_resumes_from_its_own_private_parameters_and_the_new_global_shared_ones():
    model = make_model("cnn2d", SHAPE, channels=(4,))
    init = model.init_params(SHAPE, KeyedRng(0))
    site, training = _sites()[0], LocalTraining(model, 0.1, 2, 8)
    seen = []

    def recording(global_params, data, config, state, rng):
        seen.append({k: v.copy() for k, v in global_params.items()})
        return local_sgd_update(global_params, data, config, state, rng)

    update = keep_private(recording, is_norm, method="fedbn")
    _, state = update(init, site, training, None, KeyedRng(0))
    assert all(not np.array_equal(state.private[k], init[k]) for k in state.private if is_norm_statistic(k))
    new_global = {k: v + 0.5 for k, v in init.items()}  # what the server sends next round
    update(new_global, site, training, state, KeyedRng(1))
    for k in init:
        np.testing.assert_array_equal(seen[1][k], state.private[k] if is_norm(k) else new_global[k])
    # the stored private parameters are the trained ones (start + the rule's delta)
    up, _ = local_sgd_update(init, site, training, None, KeyedRng(0))
    for k in state.private:
        np.testing.assert_array_equal(state.private[k], init[k] + up.payload[k])


def test_a_site_that_never_took_part_gets_the_global_model():
    model = make_model("cnn2d", SHAPE, channels=(4, 8))
    init = model.init_params(SHAPE, KeyedRng(0))
    training = LocalTraining(model, 0.1, 3, 8)
    personal = personalize_private(init, _sites()[0], training, None, KeyedRng(0))
    for k in init:  # BatchNorm statistics are recomputed on the site's rows; the rest is the global model
        if not is_norm_statistic(k):
            np.testing.assert_array_equal(personal[k], init[k])
    own = {k: v + 1.0 for k, v in init.items() if is_head(k)}
    personal = personalize_private(init, _sites()[0], training, PrivateState(None, own), KeyedRng(0))
    assert all(np.array_equal(personal[k], own[k] if is_head(k) else init[k]) for k in init if not is_norm_statistic(k))


def test_models_without_a_private_or_a_shared_part_are_refused_with_a_clear_error():
    cases = [
        ("fedbn", make_model("cnn2d", SHAPE, channels=(4,), norm="none"), "no parameter this method keeps private"),
        ("fedbn", LogisticRegression(), "no parameter this method keeps private"),
        ("fedper", make_model("torch_logistic", SHAPE), "nothing is left to share"),
    ]
    for method, model, message in cases:
        sites = _sites() if not isinstance(model, LogisticRegression) else [
            LocalData(s.name, s.X.reshape(s.n, -1).astype(np.float64), s.y) for s in _sites()
        ]
        init = model.init_params(sites[0].X.shape[1:], KeyedRng(0))
        with pytest.raises(ConfigError, match=message):
            run_federated(_build(method), init, sites, LocalTraining(model, 0.1, 2, 8), 1, KeyedRng(0))


def test_partial_sharing_refuses_gradient_rules_and_rules_whose_extras_mirror_the_parameters():
    model = make_model("cnn2d", SHAPE, channels=(4,))
    init = model.init_params(SHAPE, KeyedRng(0))
    site, training = _sites()[0], LocalTraining(model, 0.1, 2, 8)
    with pytest.raises(ConfigError, match="uploads gradients"):
        keep_private(fedsgd_gradient, is_norm, method="fedbn")(init, site, training, None, KeyedRng(0))
    control = {k: np.zeros_like(v) for k, v in init.items()}
    with pytest.raises(ConfigError, match="'control_delta' holds private parameters"):
        keep_private(scaffold_update, is_norm, method="fedbn")(init, site, training, None, KeyedRng(0), server_control=control)


def test_method_specs_and_their_options():
    for spec in IMAGE_METHODS:
        assert spec.kind == "federated" and spec.uploads == "delta" and spec.personal and not spec.global_model
        assert spec.family == "survey §3.2" and spec.reference
    assert SPECS["fedbn"].defaults == {"local_affine": True}
    assert _build("fedbn", local_affine=False).private("body.0.norm.weight") is False
    assert _build("fedbn").private("body.0.norm.weight") is True
    with pytest.raises(ConfigError, match="option 'local_affine' must be true or false, got 1"):
        _build("fedbn", local_affine=1)
    with pytest.raises(ConfigError, match="has no option 'mu'"):
        _build("fedper", mu=0.1)


def test_the_results_privacy_section_names_what_each_setting_keeps_at_the_sites():
    from medfed.data.datasets import load_dataset
    from medfed.experiments.config import build_config
    from medfed.experiments.harness import run_experiment
    from medfed.experiments.results import results_document

    fed = load_dataset("breast-cancer", n_sites=3)
    config = build_config({"data": {"dataset": "breast-cancer", "options": {"n_sites": 3}}, "model": "mlp",
                           "model_options": {"hidden": [4]}, "methods": ["fedavg", "fedper"], "repeats": 1,
                           "training": {"rounds": 2, "local_steps": 1}})
    doc = results_document(run_experiment(config, fed))
    sharing = doc["privacy"]["sharing"]
    assert sharing["FedAvg"]["private"] == []
    assert sharing["FedPer"]["private"] == ["head.weight", "head.bias"]
    per_round = doc["privacy"]["bytes_up_per_round_by_site"]
    for setting, by_site in per_round.items():
        total = doc["histories"][setting]["bytes_up_by_site"][0]
        assert by_site == {site: n / 2 for site, n in total.items()}
    # FedPer leaves the head out of every upload: fewer bytes per round than FedAvg
    assert all(per_round["FedPer"][s] < per_round["FedAvg"][s] for s in per_round["FedAvg"])


def test_fedbn_on_a_model_without_normalization_is_refused_before_any_setting_trains(tmp_path):
    from medfed.experiments.config import ExperimentConfig
    from medfed.experiments.harness import check_study, load_federation
    from medfed.methods import resolve_methods

    config = ExperimentConfig(data={"dataset": "mni-phantom", "options": {"n_per_site": 12, "size": 16}},
                              model="torch_logistic", methods=["single", "fedbn"], training={"rounds": 1})
    federation = load_federation(config.data)
    with pytest.raises(ConfigError, match="fedbn: model 'torch_logistic' has no parameter this method keeps private"):
        check_study(config, federation, resolve_methods(config.methods, config.method_options, config.pipelines))
