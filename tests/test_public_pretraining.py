"""Public-data pretraining, then DP fine-tuning (`--init-from`, `public_pretraining:`): weights loaded, a different
class set handled, mismatches refused in one line, overlap with the private set refused, the record in the card and
ledger, and the release stages cached."""

from __future__ import annotations

import json

import pytest
import torch

from flows.cli import run
from synth.data.ingest import ingest
from synth.data.overlap import check_disjoint
from synth.errors import InputError
from synth.train_config import TrainConfig
from synth.training import train
from tests.conftest import make_slice

FAST = {"preset": "tiny", "max_steps": 3, "batch_size": 16, "device": "cpu", "checkpoint_every": None,
        "condition_attributes": ()}


@pytest.fixture(scope="module")
def public_dataset(tmp_path_factory, data_dir):
    """A slice of the adult chest X-rays (covid_cxr_128, classes covid/other), at PneumoniaMNIST's 28 px."""
    tmp = tmp_path_factory.mktemp("public")
    full = ingest(data_dir / "covid_cxr_128.npz", tmp / "full", size=28)
    return make_slice(full, tmp / "dataset", {"train": 32, "val": 8, "test": 8})


@pytest.fixture(scope="module")
def public_model(tmp_path_factory, public_dataset):
    return train(public_dataset, tmp_path_factory.mktemp("pm") / "model", TrainConfig(**FAST), progress=False)


def test_init_from_loads_public_weights_and_resets_a_different_class_embedding(public_model, pneumonia_slice):
    from diffusers import UNet2DModel

    from synth.init_from import load_init
    from synth.model import build_unet
    from synth.train_data import load_training_data, model_config_for

    data = load_training_data(pneumonia_slice, ())
    cfg = model_config_for(data, "tiny", where_=pneumonia_slice)
    unet = build_unet(cfg)
    fresh = unet.state_dict()["class_embedding.weight"].detach().clone()
    record = load_init(unet, public_model, model_cfg=cfg, class_names=list(data.space.class_names),
                       image=data.image, dataset_hash=data.dataset_hash, dataset=pneumonia_slice)
    public = UNet2DModel.from_pretrained(public_model / "unet_ema").state_dict()
    mine = unet.state_dict()
    assert all(torch.equal(mine[k], public[k]) for k in public if k != "class_embedding.weight")
    emb = mine["class_embedding.weight"]
    assert torch.equal(emb[-1], public["class_embedding.weight"][-1])  # the null row is the public model's
    assert torch.equal(emb[:-1], fresh[:-1])  # the private classes keep the fresh model's rows...
    assert not torch.equal(emb[0], emb[1])  # ...which are distinct, so the condition can be learnt under DP noise
    card = json.loads((public_model / "model_card.json").read_text())
    assert record["content_hash"] == card["content_hash"] and record["trained_on"] == card["inputs"]["dataset"]
    assert "re-initialised" in record["class_embedding"] and record["public_class_names"] != ["normal", "pneumonia"]


def test_dp_fine_tuning_records_the_public_model_in_card_ledger_and_datasheet_text(public_model, public_dataset,
                                                                                  pneumonia_slice, tmp_path):
    out = tmp_path / "model"
    assert run(["train", str(pneumonia_slice), "--out", str(out), "--preset", "tiny", "--max-steps", "3",
                "--batch-size", "16", "--device", "cpu", "--no-progress", "--dp", "--epsilon", "8",
                "--accountant", "rdp", "--init-from", str(public_model), "--public-dataset",
                str(public_dataset)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    public_card = json.loads((public_model / "model_card.json").read_text())
    assert card["inputs"]["init_from"] == public_card["content_hash"]
    assert card["init_from"]["data_license"] == public_card["license"]
    ledger = json.loads((out / "privacy_ledger.json").read_text())
    assert ledger["public_pretraining"]["content_hash"] == public_card["content_hash"]
    assert "private training images only" in card["privacy"]["explanation"]
    check = card["init_from"]["overlap_check"]
    assert check["checked"] is True and check["shared_images"] == 0 and check["public_images"] == 48

    from reports.dataset_card import privacy_statement
    from reports.facts import PrivacyFacts

    class F:  # privacy_statement reads facts.privacy only
        privacy = PrivacyFacts.from_model_dir(out)

    statement = privacy_statement(F)
    assert "covers the private training images only" in statement
    assert "No image of that public set has the pixels of a private image" in statement
    assert public_card["content_hash"][:16] in statement


def test_mismatched_models_are_refused_in_one_line(public_dataset, public_model, pneumonia_slice, data_dir, tmp_path,
                                                   capsys):
    # Another UNet (the small preset) and another image size (64 px) are refused before training.
    small = train(public_dataset, tmp_path / "small", TrainConfig(**{**FAST, "preset": "small", "max_steps": 1}),
                  progress=False)
    argv = ["train", str(pneumonia_slice), "--preset", "tiny", "--max-steps", "1", "--device", "cpu",
            "--batch-size", "16", "--no-progress"]
    assert run([*argv, "--out", str(tmp_path / "a"), "--init-from", str(small)]) == 2
    assert "has another UNet" in capsys.readouterr().err
    wide = ingest(data_dir / "covid_cxr_128.npz", tmp_path / "covid64", size=64)
    big = train(make_slice(wide, tmp_path / "p64", {"train": 16, "val": 2, "test": 2}), tmp_path / "big",
                TrainConfig(**{**FAST, "max_steps": 1}), progress=False)
    assert run([*argv, "--out", str(tmp_path / "c"), "--init-from", str(big)]) == 2
    assert "was trained on 64×64×1 images, this dataset has 28×28×1" in capsys.readouterr().err
    # The private set itself as "public": refused.
    own = train(pneumonia_slice, tmp_path / "own", TrainConfig(**{**FAST, "max_steps": 1}), progress=False)
    assert run([*argv, "--out", str(tmp_path / "b"), "--init-from", str(own)]) == 2
    assert "same dataset" in capsys.readouterr().err
    # --public-dataset must be the data the public model was trained on.
    assert run([*argv, "--out", str(tmp_path / "d"), "--init-from", str(small), "--public-dataset",
                str(pneumonia_slice)]) == 2
    assert "is not the dataset the init_from model was trained on" in capsys.readouterr().err
    # An epsilon model cannot start a v-prediction run (its outputs mean something else).
    (tmp_path / "v.yaml").write_text("prediction_type: v_prediction\n")
    assert run([*argv, "--out", str(tmp_path / "e"), "--config", str(tmp_path / "v.yaml"), "--init-from",
                str(public_model)]) == 2
    assert "was trained to predict epsilon, this run predicts v_prediction" in capsys.readouterr().err
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_overlap_with_the_private_set_is_refused(pneumonia_dataset, pneumonia_slice, public_dataset):
    # A slice re-packs PneumoniaMNIST images: every one of them is found by its pixel hash.
    with pytest.raises(InputError, match="128 of its 128 images have the pixels of private images"):
        check_disjoint(pneumonia_slice, pneumonia_dataset)
    checked = check_disjoint(public_dataset, pneumonia_dataset)
    assert checked["shared_images"] == 0 and checked["private_images"] > 5000


def test_public_pretraining_stages_are_cached_and_refuse_overlap(tmp_path, pneumonia_npz, pneumonia_slice, data_dir):
    from flows.release_config import ReleaseConfig
    from flows.stage_generator import train_stage
    from flows.stage_public import PUBLIC_MODEL, public_pretraining_stage, with_init_from

    # The private set: a 64/32/32 slice of PneumoniaMNIST; the public one: covid_cxr_128 at 28 px.
    cfg = ReleaseConfig.model_validate({
        "workdir": str(tmp_path / "work"), "device": "cpu",
        "train": {**FAST, "max_steps": 2},
        "dp": {"enabled": True, "epsilon": 8.0, "accountant": "rdp"},
        "public_pretraining": {"source": {"path": str(data_dir / "covid_cxr_128.npz"), "size": 28},
                               "license": "per image (see covid_cxr_128_meta.csv)",
                               "attribution": "Cohen et al., COVID-19 image data collection (2020 snapshot)",
                               "train": {**FAST, "max_steps": 2}},
    })
    public = public_pretraining_stage(cfg, pneumonia_slice)
    assert public.name == PUBLIC_MODEL
    card = json.loads((public / "model_card.json").read_text())
    assert card["license"].startswith("per image") and card["privacy"] is None  # pretraining is never DP
    stamp = (tmp_path / "work" / ".stages" / f"{PUBLIC_MODEL}.json").read_text()
    assert public_pretraining_stage(cfg, pneumonia_slice) == public
    assert (tmp_path / "work" / ".stages" / f"{PUBLIC_MODEL}.json").read_text() == stamp  # reused, not retrained
    model = train_stage(with_init_from(cfg, public), pneumonia_slice)
    ledger = json.loads((model / "privacy_ledger.json").read_text())
    assert ledger["public_pretraining"]["content_hash"] == card["content_hash"]

    # The private data declared as public: refused before any pretraining.
    pre = cfg.public_pretraining
    source = pre.source.model_copy(update={"path": str(pneumonia_npz), "size": None})
    bad = cfg.model_copy(update={"workdir": tmp_path / "bad", "public_pretraining": pre.model_copy(
        update={"source": source})})
    with pytest.raises(InputError, match="must not contain the private data"):
        public_pretraining_stage(bad, pneumonia_slice)
    assert not (tmp_path / "bad" / PUBLIC_MODEL).exists()


def test_release_config_refuses_inconsistent_public_pretraining(data_dir):
    from flows.release_config import ReleaseConfig

    pre = {"source": {"path": str(data_dir / "covid_cxr_128.npz"), "size": 28}, "license": "x", "attribution": "y",
           "train": {"preset": "small"}}
    with pytest.raises(ValueError, match="same UNet"):
        ReleaseConfig.model_validate({"train": {"preset": "tiny"}, "public_pretraining": pre})
    with pytest.raises(ValueError, match="not both"):
        ReleaseConfig.model_validate({"train": {"preset": "small", "init_from": "m"}, "public_pretraining": pre})
    with pytest.raises(ValueError, match=r"prediction_type 'epsilon' differs from train\.prediction_type 'v_pred"):
        ReleaseConfig.model_validate({"train": {"preset": "small", "prediction_type": "v_prediction"},
                                      "public_pretraining": pre})
    with pytest.raises(ValueError, match="license"):
        ReleaseConfig.model_validate({"public_pretraining": {k: v for k, v in pre.items() if k != "license"}})
