"""contrastive (Wu et al., 2021, 2022; Dong & Voiculescu, 2021): federated NT-Xent pretraining of the
encoder, then the fine-tuning method. Its properties: phase 1 uploads the encoder only; NT-Xent
matches a hand computation; pretrain_rounds = 0 is the fine-tuning method exactly; same seed, same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medfed.client import LocalData, LocalTraining
from medfed.client.contrastive import (
    ProjectionState,
    contrastive_pretrain_update,
    nt_xent,
)
from medfed.deploy.study import check_settings
from medfed.errors import ConfigError
from medfed.experiments.config import build_config
from medfed.experiments.harness import (
    check_unlabeled_study,
    load_federation,
    run_experiment,
)
from medfed.experiments.results import results_document
from medfed.methods.registry import METHODS
from medfed.models.torch_models import TorchModel
from medfed.rng import KeyedRng

OPTS = {"temperature": 0.5, "projection": 8, "noise": 0.1}


def _reference_nt_xent(z1, z2, t):
    """NT-Xent written out row by row (Chen et al., 2020, eq. 1), in float64 numpy."""
    z = np.concatenate([z1, z2])
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        others = [np.exp(z[i] @ z[k] / t) for k in range(n2) if k != i]
        total += -np.log(np.exp(z[i] @ z[j] / t) / sum(others))
    return total / n2


def test_nt_xent_matches_a_hand_computation():
    rng = np.random.default_rng(1)
    z1, z2 = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    for t in (0.1, 0.5, 2.0):
        got = float(nt_xent(torch.tensor(z1), torch.tensor(z2), t))
        assert got == pytest.approx(_reference_nt_xent(z1, z2, t), abs=1e-6)
    same = float(nt_xent(torch.tensor(z1), torch.tensor(z1 * 3.0), 0.5))  # aligned views: lower than random ones
    assert same < float(nt_xent(torch.tensor(z1), torch.tensor(z2), 0.5))


def _site(seed=0, n=6, unlabeled=4):
    rng = np.random.default_rng(seed)
    return LocalData(f"s{seed}", rng.normal(size=(n, 1, 8, 8)), rng.integers(0, 2, n).astype(float),
                     rng.normal(size=(unlabeled, 1, 8, 8)) if unlabeled else None)


def test_pretraining_uploads_the_encoder_only_and_keeps_the_projection():
    model = TorchModel("cnn2d", channels=(4, 4), dtype="float64")
    params = model.init_params((1, 8, 8), KeyedRng(0))
    site = _site()
    training = LocalTraining(model, lr=0.1, steps=3, batch_size=4)
    upload, state = contrastive_pretrain_update(params, site, training, None, KeyedRng(0, (1,)), **OPTS)
    assert sorted(upload.payload) == sorted(k for k in params if not k.startswith("head."))
    assert not any("proj" in k or k in state.params for k in upload.payload)
    assert upload.n_examples == 10  # labeled and unlabeled rows
    assert any(np.abs(v).max() > 0 for v in upload.payload.values())  # the encoder moved
    assert isinstance(state, ProjectionState) and state.params["w1"].shape == (8, 4)
    _, later = contrastive_pretrain_update(params, site, training, state, KeyedRng(0, (2,)), **OPTS)
    assert not np.array_equal(later.params["w1"], state.params["w1"])  # the site's projection keeps training
    with pytest.raises(ConfigError, match="contrastive.*torch_logistic"):
        logistic = TorchModel("torch_logistic")
        contrastive_pretrain_update(logistic.init_params((1, 8, 8), KeyedRng(0)), site,
                                    LocalTraining(logistic, 0.1, 1), None, KeyedRng(0), **OPTS)


def _config(methods=("fedavg", "contrastive"), **options):
    return build_config({
        "data": {"dataset": "mni-phantom", "options": {"n_per_site": 16, "size": 16}, "labeled_fraction": 0.5},
        "model": "cnn2d", "model_options": {"channels": [4, 4]}, "repeats": 1, "methods": list(methods),
        "training": {"rounds": 2, "local_steps": 2, "batch_size": 8},
        "method_options": {"contrastive": {"pretrain_rounds": 2, "projection": 8, **options}},
    })


def _histories(config):
    doc = results_document(run_experiment(config, load_federation(config.data)))
    return doc["histories"]


def test_zero_pretraining_rounds_is_the_finetune_method_exactly_and_pretraining_moves_it():
    zero = _histories(_config(pretrain_rounds=0))
    assert zero["FedAvg"] == zero["Contrastive"]
    some = _histories(_config())
    assert some["FedAvg"] == zero["FedAvg"] and some["Contrastive"] != some["FedAvg"]
    again = _histories(_config())
    assert again == some  # same seed, same numbers


def test_the_pretraining_rounds_uploads_are_counted_in_the_communication():
    doc = results_document(run_experiment(_config(), load_federation(_config().data)))
    fedavg, contrastive = doc["histories"]["FedAvg"], doc["histories"]["Contrastive"]
    assert contrastive["communication_rounds"] == fedavg["communication_rounds"] + 2  # pretrain_rounds
    # an encoder-only upload per pretraining round, then the whole model per fine-tuning round
    assert fedavg["bytes_up_per_run"] < contrastive["bytes_up_per_run"] < 2 * fedavg["bytes_up_per_run"]
    assert len(contrastive["train_loss"]) == len(fedavg["train_loss"])  # the losses are phase 2's


def test_refused_before_training_where_it_cannot_run():
    spec = METHODS["contrastive"]
    with pytest.raises(ConfigError, match="finetune"):
        spec.validate({"finetune": "mix"})
    with pytest.raises(ConfigError, match="finetune"):
        spec.validate({"finetune": "contrastive"})
    assert spec.validate({"finetune": "FedProx"})["finetune"] == "FedProx"
    cfg = _config().model_copy(update={"model": "logistic"})
    with pytest.raises(ConfigError, match="contrastive.*'logistic'"):
        check_unlabeled_study(cfg, [(spec, spec.validate({}))])
    # a deployed study refuses what the simulation does (it runs phase 1 over the link: tests/test_deploy_fewlabels.py)
    deployed = build_config({"data": {"dataset": "mni-phantom"}, "model": "logistic", "methods": ["contrastive"]})
    with pytest.raises(ConfigError, match="contrastive.*'logistic'"):
        check_settings(deployed, "study.toml", manifest=False)


def test_pretraining_is_the_same_in_process_and_in_a_process_pool():
    from medfed.engine import run_federated
    from medfed.methods.contrastive import _pretrain

    model = TorchModel("cnn2d", channels=(4, 4), dtype="float64")
    params = model.init_params((1, 8, 8), KeyedRng(0))
    phase = _pretrain(METHODS["contrastive"].validate({"projection": 8}), None, None)
    sites, training = [_site(0), _site(1, unlabeled=0)], LocalTraining(model, 0.1, 2, 4)
    runs = [run_federated(phase.algorithm, params, sites, training, 2, KeyedRng(3), executor=e)
            for e in ("inprocess", "process")]
    assert all(np.array_equal(runs[0].params[k], runs[1].params[k]) for k in params)
    assert np.array_equal(runs[0].params["head.weight"], params["head.weight"])  # the head never left its start
    assert not np.array_equal(runs[0].params["body.0.conv.weight"], params["body.0.conv.weight"])


def test_pretraining_runs_torch_under_the_models_thread_limit(monkeypatch):
    """The pretraining round is the site's own torch computation: like the model's training it runs
    with the model's ``threads`` (a site sharing cores with others must not take them all)."""
    seen = []
    grad = torch.autograd.grad

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return grad(*args, **kwargs)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch.autograd, "grad", spy)
        model = TorchModel("cnn2d", channels=(4, 4), threads=1)
        contrastive_pretrain_update(model.init_params((1, 8, 8), KeyedRng(0)), _site(), LocalTraining(model, 0.1, 2, 4),
                                    None, KeyedRng(0, (1,)), **OPTS)
        assert seen == [1, 1] and torch.get_num_threads() == 2  # the caller's count is restored
    finally:
        torch.set_num_threads(before)
