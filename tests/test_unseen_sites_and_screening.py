"""Leave-one-site-out evaluation, upload screening on the server, dynamic fusion, option types."""

import copy
import dataclasses
import math

import numpy as np
import pytest

from medfed.client import LocalData, LocalTraining, local_sgd_update, sgd_steps
from medfed.client.reporting import with_round_report
from medfed.client.upload import Upload
from medfed.data.preprocess import Standardizer
from medfed.engine import run_federated
from medfed.engine.loop import FederatedAlgorithm
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import prepare_repeat, run_experiment
from medfed.experiments.results import results_document, table_rows
from medfed.methods.registry import METHODS, resolve_methods
from medfed.methods.steps import build_pipeline
from medfed.models import LogisticRegression
from medfed.rng import KeyedRng
from medfed.server import apply_delta, chain, weighted_mean
from medfed.server.fusion import dynamic_fusion
from medfed.server.validate import screen_uploads, upload_problem

MODEL = LogisticRegression()
GLOBAL = {"weight": np.zeros(3), "bias": np.zeros(1)}


def _config(**kw):
    values = {"data": {"dataset": "adni-like"}, "repeats": 2, "training": {"rounds": 8, "local_steps": 4}}
    values.update(kw)
    return build_config(values)


# ---------------------------------------------------------------- leave one site out


def test_loso_rows_train_without_the_held_out_site_and_test_on_it(federation):
    config = _config(methods=["mix", "fedavg", "single"], loso=True)
    doc = results_document(run_experiment(config, federation))
    loso = [r for r in doc["results"] if r["evaluation"] == "loso"]
    names = federation.site_names
    assert {(r["setting"], r["train_site"], r["test_site"]) for r in loso} == {
        (s, None, site) for s in ("Mix", "FedAvg") for site in names
    }  # Single has no unseen-site reading
    assert {r["evaluation"] for r in doc["results"]} == {"split", "loso"}

    # recompute the held-out readings independently for repeat 0: standardize with the other
    # sites' training rows, train on them alone, score the held-out site's test rows
    t = config.training
    sites = prepare_repeat(federation, config, 0)
    for h, held in enumerate(sites):
        others = [s for i, s in enumerate(sites) if i != h]
        scale = Standardizer.from_moments([s.moments for s in others])
        train = [LocalData(s.name, scale(s.X_train), s.y_train) for s in others]
        central = LocalTraining(MODEL, t.lr, t.rounds * t.local_steps, None, t.l2)
        pooled = LocalData("p", np.concatenate([d.X for d in train]), np.concatenate([d.y for d in train]))
        mix_params, _ = sgd_steps(MODEL.init(pooled.X.shape[1]), pooled, central, KeyedRng(0))
        fed = run_federated(METHODS["fedavg"].build({}, t, None), MODEL.init(pooled.X.shape[1]), train,
                            LocalTraining(MODEL, t.lr, t.local_steps, None, t.l2), t.rounds, KeyedRng(0))
        for setting, params in (("Mix", mix_params), ("FedAvg", fed.params)):
            row = next(r for r in loso if r["setting"] == setting and r["test_site"] == held.name)
            scores = MODEL.predict_proba(params, scale(held.X_test))
            acc = float(np.mean((scores >= 0.5) == (held.y_test == 1)))
            assert row["metrics"]["acc"]["values"][0] == pytest.approx(acc, abs=1e-12)


def test_loso_rows_form_their_own_block_in_the_table(federation):
    doc = results_document(run_experiment(_config(methods=["fedavg"], loso=True, repeats=1), federation))
    shown = [r["test_site"] for r in table_rows(doc)]
    first_unseen = next(i for i, s in enumerate(shown) if s.endswith("(unseen)"))
    assert all(not s.endswith("(unseen)") for s in shown[:first_unseen])
    assert all(s.endswith("(unseen)") for s in shown[first_unseen:])
    assert len(shown) == 2 * len(federation.site_names)


# ---------------------------------------------------------------- upload screening


def _upload(payload=None, kind="delta", n=10, site="a"):
    payload = payload if payload is not None else {"weight": np.ones(3), "bias": np.ones(1)}
    return Upload(site, payload, n, kind, {"loss": 1.0})


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"weight": np.ones(3)}, "missing ['bias']"),
        ({"weight": np.ones(3), "bias": np.ones(1), "head": np.ones(2)}, "unexpected ['head']"),
        ({"weight": np.ones(4), "bias": np.ones(1)}, "shape (4,)"),
        ({"weight": np.ones(3, dtype=int), "bias": np.ones(1)}, "dtype int"),
        ({"weight": np.array([1.0, np.nan, 0.0]), "bias": np.ones(1)}, "NaN or Inf"),
        ({"weight": np.array([1.0, np.inf, 0.0]), "bias": np.ones(1)}, "NaN or Inf"),
        ({"weight": [1.0, 2.0, 3.0], "bias": np.ones(1)}, "not an array"),
    ],
)
def test_malformed_uploads_are_rejected_with_the_reason(payload, expected):
    problem = upload_problem(_upload(payload), GLOBAL)
    assert problem is not None and expected in problem


def test_norm_bound_and_kind_are_checked():
    big = _upload({"weight": np.full(3, 10.0), "bias": np.zeros(1)})
    assert "exceeds the bound 5" in upload_problem(big, GLOBAL, max_norm=5.0)
    assert upload_problem(big, GLOBAL, max_norm=20.0) is None
    uploads = [_upload(site="a"), _upload(site="b"), _upload(kind="gradient", site="c")]
    accepted, rejected = screen_uploads(uploads, GLOBAL)
    assert [u.site for u in accepted] == ["a", "b"] and list(rejected) == ["c"]
    assert "'gradient'" in rejected["c"]
    assert upload_problem(_upload(n=0), GLOBAL) is not None


def _poisoning_rule(bad_site, bad_round_from, payload_fn):
    """FedAvg's client, except ``bad_site`` sends ``payload_fn(delta)`` from a given round on."""
    calls = {}

    def rule(global_params, data, config, state, rng):
        upload, state = local_sgd_update(global_params, data, config, state, rng)
        calls[data.name] = calls.get(data.name, -1) + 1
        if data.name == bad_site and calls[data.name] >= bad_round_from:
            upload = Upload(upload.site, payload_fn(upload.payload), upload.n_examples, upload.kind, upload.metrics)
        return upload, state

    return rule


def _sites(federation):
    return [LocalData(s.name, s.X, s.y.astype(float)) for s in federation.sites]


def test_engine_drops_a_nan_upload_and_goes_on_with_the_rest(federation):
    sites = _sites(federation)
    training = LocalTraining(MODEL, 0.1, 3)
    nan = _poisoning_rule("site-1", 2, lambda p: {k: v * np.nan for k, v in p.items()})
    agg = chain(weighted_mean(), apply_delta())
    run = run_federated(FederatedAlgorithm("x", nan, agg), MODEL.init(5), sites, training, 4, KeyedRng(0))
    assert all(np.isfinite(v).all() for v in run.params.values())
    assert [bool(r.rejected) for r in run.history] == [False, False, True, True]
    assert "NaN" in run.history[2].rejected["site-1"]
    assert run.history[2].sites == ("site-0", "site-2")
    # the rounds before the NaN equal clean FedAvg; afterwards only two sites move the model
    clean = run_federated(FederatedAlgorithm("x", local_sgd_update, agg), MODEL.init(5), sites, training, 2, KeyedRng(0))
    nan_again = _poisoning_rule("site-1", 2, lambda p: {k: v * np.nan for k, v in p.items()})
    two = run_federated(FederatedAlgorithm("x", nan_again, agg), MODEL.init(5), sites, training, 2, KeyedRng(0))
    np.testing.assert_array_equal(two.params["weight"], clean.params["weight"])


def test_round_is_skipped_when_too_few_valid_uploads_remain(federation):
    sites = _sites(federation)
    huge = _poisoning_rule("site-0", 1, lambda p: {k: v * 1e6 for k, v in p.items()})
    agg = chain(weighted_mean(), apply_delta())
    run = run_federated(FederatedAlgorithm("x", huge, agg), MODEL.init(5), sites, LocalTraining(MODEL, 0.1, 3),
                        3, KeyedRng(0), min_sites=3, max_update_norm=50.0)
    huge_again = _poisoning_rule("site-0", 1, lambda p: {k: v * 1e6 for k, v in p.items()})
    first = run_federated(FederatedAlgorithm("x", huge_again, agg), MODEL.init(5), sites, LocalTraining(MODEL, 0.1, 3),
                          1, KeyedRng(0), min_sites=3, max_update_norm=50.0)
    assert run.history[0].skipped is None
    assert run.history[1].skipped and "fewer than the 3 required" in run.history[1].skipped
    assert "exceeds the bound 50" in run.history[1].rejected["site-0"]
    np.testing.assert_array_equal(run.params["weight"], first.params["weight"])  # rounds 2, 3 left it as it was


def _same(a, b) -> bool:
    """Equal client states: None, arrays, and dataclasses, mappings or tuples of them (bit for bit)."""
    if a is None or b is None:
        return a is b
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and _same(dataclasses.asdict(a), dataclasses.asdict(b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return np.array_equal(a, b)


def _recording(rule, inflated):
    """``rule``, recording each call's client state in and out (``calls[site][k]`` for the site's
    k-th call); the uploads of the (site, call) pairs in ``inflated`` are scaled by 1e6, so the
    server's norm bound rejects them while the rule's new state is the honest one."""
    calls: dict[str, list[tuple]] = {}

    def update(global_params, data, config, state, rng, **message):
        upload, new = rule(global_params, data, config, state, rng, **message)
        mine = calls.setdefault(data.name, [])
        if (data.name, len(mine)) in inflated:
            upload = dataclasses.replace(upload, payload={k: v * 1e6 for k, v in upload.payload.items()})
        mine.append((copy.deepcopy(state), copy.deepcopy(new)))
        return upload, new

    return update, calls


@pytest.mark.parametrize("name, opts", [("scaffold", {}), ("scaffold", {"weighting": "uniform"}),
                                        ("apfl", {"alpha": 0.5}), ("ditto", {"lam": 0.1})])
def test_a_rejected_upload_leaves_the_sites_state_as_it_was(federation, name, opts):
    """The server refuses site-1's upload in rounds 2 and 3 and site-0's in rounds 4 and 5; in
    round 5 site-1's too, so with min_sites 2 that round is skipped for everyone. A site's state
    advances exactly when the server used its upload; otherwise it enters the next round as it
    entered the refused one."""
    from medfed.client.drift import label_counts
    from medfed.methods.method import context_for

    sites = _sites(federation)
    t = build_config({"data": {"dataset": "adni-like"}}).training
    algorithm = METHODS[name].build(
        METHODS[name].validate(opts), t, context_for([s.name for s in sites], 0, {s.name: label_counts(s.y) for s in sites})
    )
    inflated = {("site-1", 1), ("site-1", 2), ("site-0", 3), ("site-0", 4), ("site-1", 4)}
    rule, calls = _recording(algorithm.local_update, inflated)
    run = run_federated(dataclasses.replace(algorithm, local_update=rule), MODEL.init(5), sites,
                        LocalTraining(MODEL, 0.1, 3), 6, KeyedRng(0), min_sites=2, max_update_norm=1e3)
    assert [sorted(r.rejected) for r in run.history] == [[], ["site-1"], ["site-1"], ["site-0"],
                                                         ["site-0", "site-1"], []]
    assert [bool(r.skipped) for r in run.history] == [False] * 4 + [True, False]
    for site in sites:
        mine = calls[site.name]
        assert len(mine) == 6
        for r, (before, after) in enumerate(mine):
            assert not _same(before, after)  # the method does keep state that moves every round
            used = site.name in run.history[r].sites and run.history[r].skipped is None
            expected = after if used else before
            following = mine[r + 1][0] if r + 1 < len(mine) else run.client_states[site.name]
            assert _same(following, expected), (site.name, r, used)
    if name == "scaffold":
        # the server's c is still the (example-)weighted mean of the sites' c_i
        w = [s.n if opts.get("weighting", "examples") == "examples" else 1.0 for s in sites]
        c = run.server_state["scaffold_control"].control
        for k in c:
            mean = sum(wi * run.client_states[s.name].control[k] for wi, s in zip(w, sites)) / sum(w)
            np.testing.assert_allclose(c[k], mean, rtol=0, atol=1e-14)


def test_server_notes_reach_the_results_document(federation):
    config = _config(methods=["fedavg"], repeats=1, training={"rounds": 3, "local_steps": 2, "max_update_norm": 1e-6})
    doc = results_document(run_experiment(config, federation))
    notes = doc["histories"]["FedAvg"]["server_notes"][0]["rounds"]
    assert len(notes) == 3 and all("exceeds the bound" in reason for n in notes for reason in n["rejected"].values())


# ---------------------------------------------------------------- dynamic fusion


def _fusion_run(federation, deadline, bar, latencies, jitter=0.0, sites=None):
    sites = sites or _sites(federation)
    rule = with_round_report(local_sgd_update, latencies, jitter)
    algo = FederatedAlgorithm("df", rule, chain(dynamic_fusion(deadline, bar), apply_delta()))
    return run_federated(algo, MODEL.init(5), sites, LocalTraining(MODEL, 0.1, 3), 5, KeyedRng(3))


def test_dynamic_fusion_without_deadline_or_bar_is_fedavg(federation):
    run = _fusion_run(federation, math.inf, 0.0, {}, jitter=0.8)
    sites = _sites(federation)
    fedavg = run_federated(FederatedAlgorithm("f", local_sgd_update, chain(weighted_mean(), apply_delta())),
                           MODEL.init(5), sites, LocalTraining(MODEL, 0.1, 3), 5, KeyedRng(3))
    np.testing.assert_allclose(run.params["weight"], fedavg.params["weight"], rtol=0, atol=1e-15)
    assert all(r.report is None for r in run.history)


def test_dynamic_fusion_drops_a_late_site_every_round(federation):
    run = _fusion_run(federation, 5.0, 0.0, {"site-0": 10.0})
    assert all(list(r.report["dynamic_fusion"]["dropped"]) == ["site-0"] for r in run.history)
    assert "deadline 5" in run.history[0].report["dynamic_fusion"]["dropped"]["site-0"]
    sites = _sites(federation)
    without = run_federated(FederatedAlgorithm("f", local_sgd_update, chain(weighted_mean(), apply_delta())),
                            MODEL.init(5), sites[1:], LocalTraining(MODEL, 0.1, 3), 5, KeyedRng(3))
    np.testing.assert_allclose(run.params["weight"], without.params["weight"], rtol=0, atol=1e-14)


def test_dynamic_fusion_keeps_the_global_model_when_nobody_qualifies(federation):
    run = _fusion_run(federation, math.inf, 1.0, {})  # no site's local accuracy reaches 1.0
    assert np.all(run.params["weight"] == 0) and len(run.history[0].report["dynamic_fusion"]["dropped"]) == 3


def test_dynamic_fusion_rejects_bad_settings():
    # checked by the options' schema, as a method's and as a pipeline step's
    with pytest.raises(ConfigError, match=r"method 'dynamic_fusion' option 'deadline' must be a number in \(0, inf\]"):
        resolve_methods(["dynamic_fusion"], {"dynamic_fusion": {"deadline": 0.0}})
    with pytest.raises(ConfigError, match=r"step 'dynamic_fusion' option 'bar' must be a number in \[0, 1\], got 1.5"):
        build_pipeline([{"step": "dynamic_fusion", "deadline": 1.0, "bar": 1.5}])


# ---------------------------------------------------------------- method options


def test_method_options_keep_their_types_and_say_what_is_wrong():
    [(_, opts)] = resolve_methods(["krum"], {"krum": {"f": 2}})
    assert opts["f"] == 2 and isinstance(opts["f"], int)
    with pytest.raises(ConfigError, match="'f' must be a whole number >= 0, got 1.5"):
        resolve_methods(["krum"], {"krum": {"f": 1.5}})
    with pytest.raises(ConfigError, match="'q' must be a number >= 0, got 'high'"):
        resolve_methods(["fair"], {"fair": {"q": "high"}})
    with pytest.raises(ConfigError, match="site name = number"):
        resolve_methods(["dynamic_fusion"], {"dynamic_fusion": {"latencies": 3}})
    [(_, opts)] = resolve_methods(["dynamic_fusion"], {"dynamic_fusion": {"latencies": {"a": 2}}})
    assert opts["latencies"] == {"a": 2.0}


def test_every_method_has_a_display_name_reference_and_builds(federation):
    from medfed.methods.method import context_for

    t = build_config({"data": {"dataset": "adni-like"}}).training
    for spec in METHODS.values():
        assert spec.display and spec.reference and spec.summary
        if spec.kind == "federated":
            algo = spec.build(spec.defaults, t, context_for(federation.site_names))
            assert isinstance(algo, FederatedAlgorithm) and callable(algo.local_update)
            algo.aggregator.init(GLOBAL)  # every step's state can be created for this model


def test_extras_are_screened_for_numbers_and_one_structure():
    def up(site, extras):
        return Upload(site, {"weight": np.ones(3), "bias": np.ones(1)}, 5, "delta", {}, extras)

    good = {"control_delta": {"weight": np.zeros(3), "bias": np.zeros(1)}}
    uploads = [
        up("a", good), up("b", good), up("c", good),
        up("d", {"control_delta": {"weight": np.array([0.0, np.nan, 0.0]), "bias": np.zeros(1)}}),
        up("e", {"control_delta": {"weight": np.zeros(4), "bias": np.zeros(1)}}),
        up("f", {"label_counts": np.array(["x", "y"])}),
    ]
    accepted, rejected = screen_uploads(uploads, GLOBAL)
    assert [u.site for u in accepted] == ["a", "b", "c"]
    assert "NaN" in rejected["d"] and "do not match" in rejected["e"] and "numbers are required" in rejected["f"]


def test_personalized_methods_report_personal_rows_next_to_global_ones(federation):
    config = _config(methods=["fedavg", "ditto", "finetune"], loso=True, method_options={"ditto": {"lam": 0.01}})
    doc = results_document(run_experiment(config, federation))
    rows = {(r["setting"], r["model"], r["evaluation"], r["test_site"]): r for r in doc["results"]}
    for setting in ("Ditto", "FineTune"):
        differs = [
            rows[(setting, "personal", "split", site)]["metrics"][m]["values"]
            != rows[(setting, "global", "split", site)]["metrics"][m]["values"]
            for site in federation.site_names for m in ("acc", "sen", "spe", "auc")
        ]
        assert any(differs)  # a personal model of its own, not the global one again
        for site in federation.site_names:
            assert (setting, "personal", "loso", site) not in rows  # an unseen site has no personal model
    for site in federation.site_names:
        # the global model of these methods is FedAvg's
        assert rows[("Ditto", "global", "split", site)]["metrics"] == rows[("FedAvg", "global", "split", site)]["metrics"]
    labels = [r["label"] for r in table_rows(doc)]
    assert "Ditto · personal" in labels and labels.index("Ditto · personal") == labels.index("Ditto") + 1
    assert {m["name"]: m["personal"] for m in doc["methods"]} == {"fedavg": False, "ditto": True, "finetune": True}


def test_fedsld_uses_the_federation_label_counts_known_at_setup_from_round_one(federation):
    from medfed.client.drift import label_counts
    from medfed.methods.method import context_for

    t = build_config({"data": {"dataset": "adni-like"}}).training
    sites = _sites(federation)
    counts = {d.name: label_counts(d.y) for d in sites}
    known = METHODS["fedsld"].build({}, t, context_for(federation.site_names, 0, counts))
    unknown = METHODS["fedsld"].build({}, t, context_for(federation.site_names, 0))
    fedavg = METHODS["fedavg"].build({}, t, context_for(federation.site_names, 0))
    training = LocalTraining(MODEL, 0.1, 3, batch_size=8)
    one = {name: run_federated(a, MODEL.init(5), sites, training, 1, KeyedRng(0)).params["weight"]
           for name, a in (("known", known), ("unknown", unknown), ("fedavg", fedavg))}
    np.testing.assert_array_equal(one["unknown"], one["fedavg"])  # no prior yet: plain cross-entropy
    assert not np.allclose(one["known"], one["fedavg"])  # mini-batches' label mix differs from the federation's


def test_local_epochs_become_per_site_steps(federation):
    training = LocalTraining(MODEL, 0.1, 3, batch_size=8, epochs=2)
    assert [training.for_site(s.n).steps for s in federation.sites] == [16, 12, 8]  # 60, 45, 30 rows
    assert LocalTraining(MODEL, 0.1, 3, epochs=2).for_site(60).steps == 2  # full batch: one step per epoch
    assert LocalTraining(MODEL, 0.1, 3).for_site(60).steps == 3
    seen = {}

    def counting(global_params, data, config, state, rng):
        seen[data.name] = config.steps
        return local_sgd_update(global_params, data, config, state, rng)

    run_federated(FederatedAlgorithm("x", counting, chain(weighted_mean(), apply_delta())), MODEL.init(5),
                  _sites(federation), training, 1, KeyedRng(0))
    assert seen == {"site-0": 16, "site-1": 12, "site-2": 8}
