"""The DPO reference: chosen by train.reference, recorded in meta.json, read back as the
implicit reward's pi_ref; within-problem critic metrics for value, PRM, ORM and implicit."""

import json
import math

import pytest
import torch
from test_train_stage import config, dpo_rows, killed_and_resumed, sft_rows, weights, write_rows
from tiny import build_tiny_model

from critics import KINDS
from pipeline.config import ModelConfig, Reference, TrainMode
from pipeline.errors import QstarError
from pipeline.run.atomic import write_json
from pipeline.stages.critics import load_critic_set, train_critics
from pipeline.stages.reference import dpo_reference, implicit_policy, load_implicit
from pipeline.stages.train import pair_metrics_of, train_policy


def _meta(directory, **meta):
    directory.mkdir(parents=True, exist_ok=True)
    write_json(directory / "meta.json", {"config": {"beta": 0.25}, **meta})
    return str(directory)


def test_dpo_reference_reads_the_policys_meta(tmp_path, tiny_model_dir):
    assert dpo_reference(str(tiny_model_dir)) is None  # the base model: no meta.json
    sft = _meta(tmp_path / "sft", source_policy="p0", metrics={"phases": ["sft"]})
    assert dpo_reference(sft) is None  # no DPO phase: no implicit reward
    old = _meta(tmp_path / "old", source_policy="p0", metrics={"phases": ["dpo"]})
    assert dpo_reference(old) == ("p0", 0.25)  # saved before `reference`: its source policy
    new = _meta(tmp_path / "new", source_policy="p1", reference="p0",
                metrics={"phases": ["dpo", "sft"]})
    assert dpo_reference(new) == ("p0", 0.25)


def test_a_reference_that_cannot_be_loaded_is_one_line(tmp_path, tiny_model):
    model, tokenizer = tiny_model
    policy = _meta(tmp_path / "policy", source_policy="p0", reference=str(tmp_path / "gone"),
                   metrics={"phases": ["dpo"]})
    with pytest.raises(QstarError) as exc:
        load_implicit(policy, model, tokenizer, ModelConfig(), 4)
    message = str(exc.value)
    assert "\n" not in message and "meta.json" in message and "reference=" in message
    assert str(tmp_path / "gone") in message


def test_train_reference_base_trains_against_the_base_and_records_it(tiny_model_dir, tmp_path):
    base = str(build_tiny_model(tmp_path / "base", seed=1))
    data = write_rows(tmp_path / "data", dpo=dpo_rows())
    previous = train_policy(str(tiny_model_dir), data, config(epochs=1), tmp_path / "previous")
    against_base = train_policy(str(tiny_model_dir), data, config(epochs=1), tmp_path / "base_ref",
                                reference_dir=base)
    assert previous["reference"] == str(tiny_model_dir) and against_base["reference"] == base
    # policy == reference: every implicit reward starts at 0 and the loss at ln 2; not so here
    assert previous["dpo/loss_first"] == pytest.approx(math.log(2), abs=1e-3)
    assert abs(against_base["dpo/loss_first"] - math.log(2)) > 1e-3
    assert abs(previous["dpo/rewards/chosen"]) != abs(against_base["dpo/rewards/chosen"])
    for run, expected in ((previous, str(tiny_model_dir)), (against_base, base)):
        meta = json.loads((tmp_path / run["policy_dir"] / "meta.json").read_text())
        assert meta["reference"] == expected
        assert dpo_reference(run["policy_dir"]) == (expected, 0.5)
    with pytest.raises(QstarError, match="train.reference=previous: cannot load the reference"):
        train_policy(str(tiny_model_dir), data, config(epochs=1), tmp_path / "bad",
                     reference_dir=str(tmp_path / "missing"))


def test_train_reference_sft_trains_dpo_from_and_against_the_sft_phase(tiny_model_dir, tmp_path):
    """train.reference=sft: SFT first, then DPO from that model against it; the SFT model is kept
    inside the policy and recorded as its reference, also when the run is killed in DPO and
    resumed; without SFT rows, DPO against policy_i."""
    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    sft_alone = train_policy(str(tiny_model_dir), data, config(mode=TrainMode.sft, epochs=2),
                             tmp_path / "sft")["policy_dir"]
    cfg = config(reference=Reference.sft, epochs=2)  # 2 SFT steps, then 2 DPO steps
    found, steps = killed_and_resumed(str(tiny_model_dir), data, cfg, tmp_path / "both", "dpo")
    assert steps == [2] and found["sft/steps"] == found["dpo/steps"] == 2  # DPO step 2 only
    policy, kept = found["policy_dir"], tmp_path / "both" / "policy" / "sft_phase"
    assert found["phases"] == ["sft", "dpo"] and found["reference"] == "sft_phase"
    assert json.loads((kept.parent / "meta.json").read_text())["reference"] == "sft_phase"
    assert dpo_reference(policy) == (str(kept.resolve()), 0.5) and implicit_policy(policy) is None
    sft_weights, kept_weights = weights(sft_alone), weights(kept)
    assert all(torch.allclose(kept_weights[k], w, atol=1e-5) for k, w in sft_weights.items())
    # DPO started from the SFT model, against it: its first loss is ln 2 (policy == reference;
    # not so against policy_i, which SFT changed)...
    assert found["dpo/loss_first"] == pytest.approx(math.log(2), abs=1e-3)
    # ...and trained against it: the pair metrics recomputed against the recorded reference
    # (the kept SFT model, loaded from disk) equal the ones TRL's reference pass gave
    again = pair_metrics_of(policy, data, cfg, ModelConfig(), tmp_path / "again")
    for key in ("dpo/after/rewards/chosen", "dpo/after/rewards/rejected"):
        assert again[key] == pytest.approx(found[key], abs=1e-4)
    assert abs(found["dpo/after/rewards/chosen"]) > 1e-3  # DPO moved away from its reference
    kept.rename(tmp_path / "elsewhere")  # a policy copied without its reference: one line
    with pytest.raises(QstarError, match="reference='sft_phase' is not a directory beside it"):
        dpo_reference(policy)
    no_sft = write_rows(tmp_path / "pairs_only", dpo=dpo_rows())
    alone = train_policy(str(tiny_model_dir), no_sft, cfg, tmp_path / "alone")
    assert alone["phases"] == ["dpo"] and alone["reference"] == str(tiny_model_dir)
    assert not (tmp_path / "alone" / "policy" / "sft_phase").exists()


def test_after_sft_the_implicit_reward_is_the_dpo_phases(tiny_model_dir, tmp_path):
    """dpo_then_sft: the log-ratio is DPO's model against the reference, teacher-forced, not the
    SFT-trained policy's; a kept model that went missing is one line; DPO alone: the policy."""
    from pipeline.config import TrainMode
    from pipeline.lm.models import load_model
    from pipeline.lm.teacher_forced import completion_logprobs

    data = write_rows(tmp_path / "data", dpo=dpo_rows(), sft=sft_rows())
    both = train_policy(str(tiny_model_dir), data, config(mode=TrainMode.dpo_then_sft, epochs=2),
                        tmp_path / "both")["policy_dir"]
    alone = train_policy(str(tiny_model_dir), data, config(epochs=2), tmp_path / "alone")["policy_dir"]
    assert implicit_policy(alone) is None and implicit_policy(str(tiny_model_dir)) is None
    assert implicit_policy(both) == str(tmp_path / "both" / "policy" / "dpo_phase")
    model, tokenizer = load_model(ModelConfig(name=both))
    critic = load_implicit(both, model, tokenizer, ModelConfig(), 4)
    assert not critic.generates and critic.policy is not model
    prompts, texts = ["Q: 2 + 3?\n", "Q: 6 + 2?\n"], ["Answer: 5\n", "Answer: 9\n"]
    ids = [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
    by_hand = [completion_logprobs(load_model(ModelConfig(name=d))[0], tokenizer, prompts, texts)
               for d in (alone, both, str(tiny_model_dir))]  # DPO alone == the kept DPO phase
    expected = [0.5 * (sum(a) - sum(r)) for a, r in zip(by_hand[0], by_hand[2])]
    sft_too = [0.5 * (sum(p) - sum(r)) for p, r in zip(by_hand[1], by_hand[2])]
    # the generation pass's log-probs are the SFT-trained policy's: not the reward's pi
    got = critic.of_tokens(prompts, ids, [[0.0] * len(i) for i in ids])
    assert got == pytest.approx(expected, abs=1e-4) and critic.of_texts(prompts, texts) == \
        pytest.approx(expected, abs=1e-4)
    assert got != pytest.approx(sft_too, abs=1e-4)
    plain = load_implicit(alone, model, tokenizer, ModelConfig(), 4)
    assert plain.generates and plain.policy is model
    import shutil
    shutil.rmtree(tmp_path / "both" / "policy" / "dpo_phase")
    with pytest.raises(QstarError) as exc:
        load_implicit(both, model, tokenizer, ModelConfig(), 4)
    assert "\n" not in str(exc.value) and "implicit_policy='dpo_phase'" in str(exc.value)


def test_critics_report_within_problem_auc_for_every_critic(tiny_model, tiny_model_dir, tmp_path):
    from test_critics_set import CFG, _shard_rows

    model, tokenizer = tiny_model
    rows = _shard_rows(num_problems=4, simulations=8)
    policy = _meta(tmp_path / "policy", source_policy=str(tiny_model_dir),
                   reference=str(build_tiny_model(tmp_path / "ref", seed=2)),
                   metrics={"phases": ["dpo"]})
    metrics = train_critics(rows, str(tiny_model_dir), CFG, tmp_path / "critics", model, tokenizer,
                            reference=dpo_reference(policy) and (dpo_reference(policy)[0], 0.25))
    for kind in (*KINDS, "implicit"):
        m = metrics[kind]
        assert "within_problem_auc" in m and "within_problem_problems" in m, kind
        if m["within_problem_auc"] is None:
            assert m["within_problem_skipped"] and m["within_problem_problems"] == 0
        else:
            assert 0 <= m["within_problem_auc"] <= 1 and m["within_problem_problems"] >= 1
    assert metrics["implicit"]["beta"] == 0.25
    assert metrics["implicit"]["heldout_examples"] == metrics["orm"]["heldout_examples"]
    none = train_critics(rows, str(tiny_model_dir), CFG, tmp_path / "c0", model, tokenizer)
    assert none["implicit"] == {"skipped": "the policy was not trained by DPO: no reference"}


def test_heads_fitted_for_other_features_say_which(tiny_model, tiny_model_dir, tmp_path):
    from test_critics_set import CFG, _shard_rows

    model, tokenizer = tiny_model
    train_critics(_shard_rows(num_problems=2, simulations=4), str(tiny_model_dir), CFG,
                  tmp_path / "critics", model, tokenizer)
    meta_path = tmp_path / "critics" / "orm" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "features": "hidden"}))  # heads read confidence
    with pytest.raises(QstarError) as exc:
        load_critic_set(tmp_path / "critics", str(tiny_model_dir), model, tokenizer, ModelConfig(), 4)
    assert "\n" not in str(exc.value) and "'orm' expects features of size 36" in str(exc.value)
    assert "'hidden' features" in str(exc.value)


def test_the_implicit_reward_is_a_leaf_value_part_in_search(debug_overrides, tiny_model, tmp_path):
    from critics import ImplicitCritic, implicit_score
    from pipeline.compose import compose_config
    from pipeline.decoding.tree_search import SearchModels, eval_search
    from pipeline.lm.models import load_model
    from pipeline.lm.teacher_forced import completion_logprobs, token_logprobs
    from pipeline.tasks.prompt import render_prompts

    model, tokenizer = tiny_model
    reference, _ = load_model(ModelConfig(name=str(build_tiny_model(tmp_path / "ref", seed=3))))
    cfg = compose_config([*debug_overrides, "critics.weights.rollout=0", "critics.weights.orm=0",
                          "critics.weights.implicit=1", "search.simulations=4"])
    critic = ImplicitCritic(model, reference, tokenizer, 0.5, completion_logprobs, token_logprobs)
    models = SearchModels(policy=model, tokenizer=tokenizer, implicit=critic)
    prompts = render_prompts(tokenizer, ["What is 1 + 1?", "What is 2 + 5?"])
    trees, scorer = eval_search(prompts, cfg, models)
    checked = 0
    for tree in trees:
        for node in range(1, tree.num_nodes):
            text = tree.text[node]
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if tree.total[node] is None or len(ids) != tree.num_tokens[node]:  # EOS: not in text
                continue
            before = tree.prompt + "".join(tree.steps(tree.parent[node]))
            ref = completion_logprobs(reference, tokenizer, [before], [text])[0]
            expected = implicit_score(0.5 * (tree.logprob[node] - sum(ref)))
            assert tree.total[node] == pytest.approx(expected, abs=1e-4)  # the only part
            checked += 1
    assert checked >= 2


def test_plots_show_dpo_rewards_and_within_problem_auc_per_iteration(tmp_path):
    from pipeline.report.plots import write_plots
    from pipeline.report.summary import policy_rows
    from pipeline.run.store import RunStore

    store = RunStore(tmp_path / "run")
    store.complete(0, "baseline", {"decodes": {"greedy": {"accuracy": 0.2}}}, 1.0)
    for k, (chosen, rejected) in enumerate(((0.1, -0.3), (-0.2, -0.9))):
        store.complete(k, "critics", {"orm": {"auc": 0.7, "within_problem_auc": 0.6 + k / 10},
                                      "value": {"within_problem_auc": 0.55},
                                      "implicit": {"skipped": "no reference"} if k == 0 else
                                      {"within_problem_auc": 0.8}}, 1.0)
        after = {"dpo/after/rewards/chosen": chosen - 0.05, "dpo/after/rewards/rejected": -0.8}
        store.complete(k, "train", {"source_policy": f"p{k}", "reference": "p0",
                                    "dpo/rewards/chosen": chosen, "dpo/rewards/rejected": rejected,
                                    "dpo/logps/chosen_change": chosen / 0.1,
                                    **(after if k == 1 else {})}, 1.0)
        store.complete(k, "eval", {"decodes": {"greedy": {"accuracy": 0.3}}}, 1.0)
        store.complete(k, "search", {"contrast_problems": 5 - k, "option_logp_per_token": -0.5 + k / 5}, 1.0)
        store.complete(k, "data", {"dpo": 20 - 8 * k, "sft": 5 + k}, 1.0)
    rows = policy_rows(store)
    assert [(r["pairs"], r["sft_rows"], r["contrast_problems"]) for r in rows[1:]] == [(20, 5, 5), (12, 6, 4)]
    assert [r["option_logp_per_token"] for r in rows[1:]] == [-0.5, pytest.approx(-0.3)]
    assert [r.get("reference") for r in rows] == [None, "previous", "base"]
    assert rows[2]["within_auc"] == {"value": 0.55, "prm": None, "orm": 0.7, "implicit": 0.8}
    assert rows[1]["within_auc"]["implicit"] is None
    # over all pairs after DPO where the run measured it, else the last logged step's batch
    assert (rows[2]["chosen_reward"], rows[2]["rejected_reward"]) == (pytest.approx(-0.25), -0.8)
    assert (rows[1]["chosen_reward"], rows[1]["rejected_reward"]) == (0.1, -0.3)
    written = write_plots(store)
    for name in ("dpo_rewards.png", "within_problem_auc.png", "search_data.png"):
        path = tmp_path / "run" / "plots" / name
        assert str(path) in written and path.stat().st_size > 1000


def test_eval_select_implicit_without_a_reference_is_one_line(debug_overrides, capsys):
    from test_cli import assert_one_error_line

    from pipeline.cli import main

    rc = main(["eval", *debug_overrides, "decode=best_of_n", "decode.select=implicit"])
    assert_one_error_line(capsys, rc, "decode.select=implicit needs a policy trained by DPO")
