"""`pmc-unlearn finetune`: the TOFU target/retain recipe on the shared loop."""

import json

import yaml
from safetensors.torch import load_file

from pmc_unlearn.cli import main
from pmc_unlearn.models import load_model, saved_prompt_format


def test_finetune_lowers_nll_and_writes_run(tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"question": f"What is item {i}?", "answer": f"Item {i} is a blue cube."} for i in range(6)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "ft"
    rc = main(["finetune", "--model", "tiny-random", "--data", str(data), "--output", str(out),
               "train.epochs=4", "train.batch_size=3", "train.lr=3e-3", "train.warmup_epochs=0"])
    assert rc == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["method"] == "sft" and cfg["train"]["epochs"] == 4.0
    assert cfg["train"]["weight_decay"] == 0.01  # TOFU recipe default
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["train/nll"] < log[0]["train/nll"]
    assert saved_prompt_format(str(out / "model"))["use_chat_template"] is True
    base = load_model("tiny-random").model.state_dict()
    after = load_file(str(out / "model" / "model.safetensors"))
    assert any(not (after[k] == base[k]).all() for k in after)


def test_finetune_needs_answers(tmp_path, capsys):
    data = tmp_path / "q.jsonl"
    data.write_text('{"question": "q?"}\n')
    assert main(["finetune", "--model", "tiny-random", "--data", str(data), "--output", str(tmp_path / "o")]) == 2
    assert "no column 'answer'" in capsys.readouterr().err
