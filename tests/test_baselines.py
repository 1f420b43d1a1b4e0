"""Baseline methods: each loss against a hand computation, and every method end to end on tiny-random."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pmc_unlearn import losses
from pmc_unlearn.cli import main
from pmc_unlearn.formatting import IGNORE
from pmc_unlearn.methods import METHODS
from pmc_unlearn.methods import baselines as B
from pmc_unlearn.methods.base import Prepared

LN34, LN14, LN12 = math.log(3 / 4), math.log(1 / 4), math.log(1 / 2)  # -0.287682, -1.386294, -0.693147


# ----- pure losses ------------------------------------------------------------------------------

def test_npo_loss_by_hand():
    # -beta (S_theta - S_ref) = -0.1 * ([-2, -1] - [-1, -1]) = [0.1, 0]
    # log sigmoid(0.1) = -log(1 + e^-0.1) = -0.644397; log sigmoid(0) = -0.693147; mean = -0.668772
    # loss = -(2 / 0.1) * -0.668772 = 13.375438
    got = losses.npo_loss(torch.tensor([-2.0, -1.0]), torch.tensor([-1.0, -1.0]), 0.1)
    assert got.item() == pytest.approx(13.375438, abs=1e-5)


def test_npo_loss_sign_pushes_likelihood_down():
    s = torch.tensor([-1.0], requires_grad=True)
    losses.npo_loss(s, torch.tensor([-1.0]), 0.1).backward()
    assert s.grad.item() > 0  # descending the loss lowers S_theta(y_f)


def test_simnpo_loss_by_hand():
    # S / |y| = [-6 / 3, -1 / 2] = [-2, -0.5]; -beta * that - gamma = [4 - 1, 1 - 1] = [3, 0]  (beta 2, gamma 1)
    # log sigmoid(3) = -0.048587; log sigmoid(0) = -0.693147; mean = -0.370867; loss = -(2 / 2) * mean = 0.370867
    got = losses.simnpo_loss(torch.tensor([-6.0, -1.0]), torch.tensor([3.0, 2.0]), beta=2.0, gamma=1.0)
    assert got.item() == pytest.approx(0.370867, abs=1e-5)


def test_dpo_loss_by_hand():
    # win log-ratio = -3 - (-4) = 1; lose log-ratio = -5 - (-3) = -2; margin = 3; beta * margin = 1.5
    # log sigmoid(1.5) = -0.201413; loss = -(2 / 0.5) * -0.201413 = 0.805653
    got = losses.dpo_loss(torch.tensor([-3.0]), torch.tensor([-4.0]), torch.tensor([-5.0]), torch.tensor([-3.0]), 0.5)
    assert got.item() == pytest.approx(0.805653, abs=1e-5)


def test_masked_mse_by_hand():
    # target [1, 0]; token 0: ((1-1)^2 + (2-0)^2) / 2 = 2; token 1: ((3-1)^2 + (4-0)^2) / 2 = 10;
    # token 2 is masked out; mean over the 2 counted tokens = 6
    acts = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]]])
    got = losses.masked_mse(acts, torch.tensor([1.0, 0.0]), torch.tensor([[True, True, False]]))
    assert got.item() == pytest.approx(6.0)


# ----- each method's loss on fixed logits ---------------------------------------------------------
# Vocabulary of 2; every position predicts p(1) = 3/4, p(0) = 1/4 (logits [0, ln 3]).
# Row "f" (forget): answer tokens [1, 1] -> S = 2 ln(3/4) = -0.575364, NLL = 0.287682.
# Row "r" (retain): answer token [0]      -> NLL = -ln(1/4) = 1.386294.
# Row "l" (rejected, for DPO): answer [0, 0] -> S = 2 ln(1/4) = -2.772589.
# A reference model predicting [1/2, 1/2] everywhere gives S_ref = 2 ln(1/2) = -1.386294 on f and l.

ROWS = {"f": [IGNORE, 1, 1], "r": [IGNORE, 0, IGNORE], "l": [IGNORE, 0, 0]}


class FixedLogits(torch.nn.Module):
    def __init__(self, row_logits):
        super().__init__()
        self.row_logits = torch.tensor(row_logits)
        self.w = torch.nn.Parameter(torch.zeros(()))  # something to differentiate

    def forward(self, input_ids, attention_mask=None, **kw):
        B_, T = input_ids.shape
        return SimpleNamespace(logits=self.row_logits.expand(B_, T, 2) + self.w)


def _prep(rows: str, n_primary: int, **extra) -> Prepared:
    labels = torch.tensor([ROWS[r] for r in rows])
    batch = {"input_ids": labels.clamp(min=0), "attention_mask": torch.ones_like(labels), "labels": labels, **extra}
    return Prepared(batch, n_primary)


CTX = SimpleNamespace(device=torch.device("cpu"))
MODEL = FixedLogits([0.0, math.log(3.0)])
UNIFORM = FixedLogits([0.0, 0.0])


def _loss(method, prep):
    loss, logs = method.loss(CTX, MODEL, prep)
    return loss.item(), logs


def test_ga_gd_losses():
    loss, logs = _loss(METHODS["ga"](B.GAConfig()), _prep("f", 1))
    assert loss == pytest.approx(LN34, abs=1e-5)  # -NLL = ln(3/4) = -0.287682
    # gd, lambda 2: -0.287682 + 2 * 1.386294 = 2.484907
    loss, logs = _loss(METHODS["gd"](B.GDConfig(retain_weight=2.0)), _prep("fr", 1))
    assert loss == pytest.approx(2.484907, abs=1e-5)
    assert logs["train/retain_nll"] == pytest.approx(1.386294, abs=1e-5)


def test_npo_loss_cached_and_live_reference():
    m = METHODS["npo"](B.NPOConfig(beta=0.1, retain_weight=2.0))
    # cached S_ref = -1.575364, so S_theta - S_ref = 1; -(2/0.1) log sigmoid(-0.1) = 20 * 0.744397 = 14.887933;
    # + 2 * 1.386294 = 17.660522
    loss, logs = _loss(m, _prep("fr", 1, ref_logp=torch.tensor([2 * LN34 - 1.0])))
    assert loss == pytest.approx(17.660522, abs=1e-4)
    assert logs["train/log_ratio"] == pytest.approx(1.0, abs=1e-5)
    # live reference predicting 1/2: S_theta - S_ref = 2 ln(3/2) = 0.810930;
    # 20 * log(1 + e^0.081093) = 20 * 0.734515 = 14.690309; + 2.772589 = 17.462898
    m.ref = UNIFORM
    loss, _ = _loss(m, _prep("fr", 1))
    assert loss == pytest.approx(17.462898, abs=1e-4)


def test_simnpo_loss_in_method():
    m = METHODS["simnpo"](B.SimNPOConfig())  # beta 4.5, gamma 0, forget weight 0.125, lambda 1
    # -beta S / |y| = 4.5 * 0.287682 = 1.294569; -(2/4.5) log sigmoid(1.294569) = 0.444444 * 0.242183 = 0.107637
    # 0.125 * 0.107637 + 1.386294 = 1.399748
    loss, _ = _loss(m, _prep("fr", 1))
    assert loss == pytest.approx(1.399748, abs=1e-5)


def test_idk_and_idkdpo_losses_in_method():
    # idk: NLL of the refusal row (here row f) + 0.5 * retain = 0.287682 + 0.693147 = 0.980829
    loss, _ = _loss(METHODS["idk"](B.IdkConfig(retain_weight=0.5)), _prep("fr", 1))
    assert loss == pytest.approx(0.980829, abs=1e-5)
    # idkdpo: rows win = f, lose = l, then retain; reference predicts 1/2.
    # margin = (2 ln(3/4) - 2 ln(1/2)) - (2 ln(1/4) - 2 ln(1/2)) = 2 ln 3 = 2.197225; beta 0.1
    # -(2/0.1) log sigmoid(0.219722) = 20 * 0.589309 = 11.786172; + 1.386294 = 13.172466
    m = METHODS["idkdpo"](B.IdkDPOConfig())
    m.ref = UNIFORM
    loss, logs = _loss(m, _prep("flr", 2))
    assert loss == pytest.approx(13.172466, abs=1e-4)
    assert logs["train/forget_nll"] == pytest.approx(-LN14, abs=1e-5)


def test_scrub_max_and_min_steps_in_method():
    # teacher predicts (1/2, 1/2), student (1/4, 3/4) at every position; T = 1:
    #   KL(teacher || student) = 1/2 ln((1/2)/(1/4)) + 1/2 ln((1/2)/(3/4)) = 1/2 ln(4/3) = 0.143841 per position
    m = METHODS["scrub"](B.SCRUBConfig(alpha=0.5, gamma=2.0, kl_temperature=1.0))
    m.teacher = UNIFORM
    # max step (forget rows only): -KL = -0.143841
    loss, logs = _loss(m, _prep("f", 1))
    assert loss == pytest.approx(-0.143841, abs=1e-5) and logs["train/forget_kl"] == pytest.approx(0.143841, abs=1e-5)
    # min step (retain rows only): 0.5 x 0.143841 + 2 x -ln(1/4) = 0.071921 + 2.772589 = 2.844510
    loss, logs = _loss(m, _prep("r", 0))
    assert loss == pytest.approx(2.844510, abs=1e-5)
    assert logs["train/retain_nll"] == pytest.approx(1.386294, abs=1e-5)


def test_retain_weight_zero_drops_retain_rows():
    m = METHODS["gd"](B.GDConfig(retain_weight=0.0))
    assert m._retain_rows(SimpleNamespace(retain=[{"question": "q", "answer": "a"}]), [0]) == []


# ----- end to end on tiny-random ------------------------------------------------------------------

BASE = ["unlearn", "--model", "tiny-random", "--forget", "tofu:forget01", "--retain", "tofu:retain99"]
QUICK = ["data.max_forget=4", "train.batch_size=2", "train.grad_accum=1", "train.epochs=1",
         "train.warmup_epochs=0", "train.lr=1e-3"]
REF_METHODS = ("npo", "idkdpo", "rmu", "scrub")


@pytest.fixture(scope="module")
def base_weights():
    from pmc_unlearn.models import load_model

    return {k: v.clone() for k, v in load_model("tiny-random").model.state_dict().items()}


def _changed(out, base):
    after = load_file(str(out / "model" / "model.safetensors"))
    return {k for k in after if k in base and not torch.equal(after[k], base[k])}


@pytest.mark.parametrize("method", ["ga", "gd", "npo", "simnpo", "idk", "idkdpo", "rmu", "retain_ft", "scrub"])
def test_method_runs_end_to_end_and_changes_weights(tmp_path, base_weights, method):
    out = tmp_path / method
    assert main([*BASE, "--method", method, "--output", str(out), *QUICK]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "completed" and man["steps"] == 2
    assert _changed(out, base_weights), "no weight moved"
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["train/loss"]) for r in rows)
    if method in REF_METHODS:
        assert man["method_info"]["reference_model_bytes"] > 0
    if method == "npo":
        # step 1 runs before any update: the cached reference log-probs equal the model's
        assert abs(rows[0]["train/log_ratio"]) < 0.05
    if method == "rmu":
        # only the down projections of the steered layer and the one before moved; the retain
        # activations start equal to the reference's
        assert _changed(out, base_weights) <= {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
        assert rows[0]["train/retain_loss"] == 0.0
        assert man["method_info"]["rmu_trainable"] == ["layers.0.mlp.down_proj.weight", "layers.1.mlp.down_proj.weight"]


def test_rmu_checkpoint_holds_only_trainable_weights(tmp_path):
    out = tmp_path / "rmu"
    assert main([*BASE, "--method", "rmu", "--output", str(out), *QUICK, "rmu.update_layers=1"]) == 0
    ckpt = next((out / "checkpoints").iterdir())
    assert list(load_file(str(ckpt / "model.safetensors"))) == ["model.layers.1.mlp.down_proj.weight"]
    info = json.loads((out / "manifest.json").read_text())["method_info"]
    assert info["rmu_layer"] == 1 and info["rmu_steering_coeff"] == pytest.approx(2 * info["rmu_mean_activation_norm"])


def test_retain_ft_matches_another_runs_time(tmp_path):
    other = tmp_path / "pmc-run"
    other.mkdir()
    # 3 s in the train phase, of which 2.999 s were checkpoint writing: 0.001 s of training to match
    (other / "manifest.json").write_text(json.dumps({"status": "completed",
                                                     "phases_s": {"train": 3.0, "train/checkpoint": 2.999}}))
    out = tmp_path / "rft"
    assert main([*BASE, "--method", "retain_ft", "--output", str(out), *QUICK, "train.epochs=50",
                 f"retain_ft.match_run={other}"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["stopped_by_time_limit"] and man["steps"] < man["planned_steps"]
    assert man["method_info"]["train_max_time_s"] == pytest.approx(0.001)


def test_scrub_end_to_end_min_then_max_pass(tmp_path, base_weights):
    # 4 forget questions, batch 2: epoch 0 = 2 min steps on retain pairs, epoch 1 = 2 max steps on forget answers
    out = tmp_path / "scrub"
    assert main([*BASE, "--method", "scrub", "--output", str(out), *QUICK, "train.epochs=2", "scrub.max_epochs=1"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "completed" and man["steps"] == 4
    assert man["method_info"]["reference_model_bytes"] > 0
    assert _changed(out, base_weights)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["train/scrub_max_phase"] for r in rows] == [0.0, 0.0, 1.0, 1.0]
    assert all("train/retain_kl" in r and "train/forget_kl" not in r for r in rows[:2])
    assert all(r["train/loss"] == pytest.approx(-r["train/forget_kl"], abs=1e-4) for r in rows[2:])
    # the first step runs before any update: the student is the teacher
    assert abs(rows[0]["train/retain_kl"]) < 1e-4
    cfg = (out / "config.yaml").read_text()
    assert "scrub:" in cfg and "kl_temperature: 4.0" in cfg


@pytest.mark.parametrize("args, msg", [
    (["--method", "npo", "npo.beta=0"], "npo.beta"),
    (["--method", "scrub", "scrub.kl_temperature=0"], "scrub.kl_temperature"),
    (["--method", "simnpo", "simnpo.retain_weight=-1"], "simnpo.retain_weight"),
    (["--method", "retain_ft", "retain_ft.match_run=/nonexistent/run"], "no manifest.json"),
    (["--method", "idk", "idk.refusals=missing.jsonl"], "missing.jsonl"),
    (["--method", "pmc", "npo.beta=0.1"], "is for method npo"),
])
def test_bad_baseline_config_exit_2(tmp_path, capsys, args, msg):
    out = tmp_path / "bad"
    assert main([*BASE, "--output", str(out), *args]) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()


# ----- SCRUB in the sweep and the demo ------------------------------------------------------------

def test_scrub_in_a_sweep_and_the_demo(tmp_path, capsys):
    import yaml

    from pmc_unlearn import demo as D

    spec = {"base": {"model": {"name": "tiny-random"}, "data": {"forget": "tofu:forget01", "max_forget": 2}},
            "methods": {"scrub": {"set": {"train.epochs": 3}, "grid": {"scrub.alpha": [0.001, 1.0]}}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["sweep", "--config", str(tmp_path / "s.yaml"), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in plan["points"]] == ["scrub train.epochs=3 alpha=0.001",
                                                     "scrub train.epochs=3 alpha=1"]
    # the demo profiles list scrub (off); turned on, it gets an unlearning and an evaluation stage
    for name in ("default", "quick", "test"):
        assert "scrub" in D.load_profile(name)["unlearn"]
    d = D.Demo(D.load_profile("test", ["unlearn.scrub={train: {epochs: 3, batch_size: 2}, scrub: {max_epochs: 1}}"]),
               tmp_path / "d")
    stages = {s.name: s for s in d.build()}
    assert stages["unlearn/scrub"].key and not stages["unlearn/scrub"].skip_reason and "eval/scrub" in stages
    off = D.Demo(D.load_profile("test"), tmp_path / "d2")
    assert "unlearn/scrub" not in {s.name for s in off.build()} and any("scrub: turned off" in n for n in off.notes)
