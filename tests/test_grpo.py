"""The GRPO baseline (train.mode=grpo): TRL's GRPOTrainer rewarded by the task's grader, in the
same run format as the MCTS loop and STaR."""

from __future__ import annotations

import json

import pytest
from test_bad_input import cli, the_error_line

from pipeline.cli import main
from pipeline.compose import compose_config
from pipeline.config import TrainMode
from pipeline.errors import ConfigError
from pipeline.loop import resume_run, run_loop
from pipeline.report.collect import run_status
from pipeline.report.inspect import iteration_table
from pipeline.run.store import RunStore
from pipeline.stages import grpo
from pipeline.tasks import make_task


def grpo_overrides(debug_overrides, *extra) -> list[str]:
    # 4 training problems, 2 per step: 2 GRPO steps of 2 x 2 completions
    return debug_overrides + [
        "train=grpo", "critics.enabled=false", "task=custom", "task.target=custom_tasks:Echo",
        "train.grpo.num_generations=2", "train.grpo.prompts_per_step=2", "train.batch_size=2",
        "train.grpo.max_completion_length=6", "train.learning_rate=1e-3", *extra]


@pytest.fixture
def recorded(monkeypatch):
    """What the reward function TRL called returned, and the completion tokens it saw."""
    class Calls(list):
        kill_at = None  # raise (a simulated kill) when the reward function is called this often

    calls = Calls()
    real = grpo.grader_reward

    def recording(task, problems):
        fn = real(task, problems)

        def grader(*args, completion_ids=None, **kwargs):
            if calls.kill_at == len(calls) + 1:
                calls.kill_at = None
                raise KeyboardInterrupt("killed")
            rewards = fn(*args, **kwargs)
            calls.append({"rewards": rewards, "tokens": sum(len(c) for c in completion_ids)})
            return rewards

        grader.__name__ = fn.__name__
        return grader

    monkeypatch.setattr(grpo, "grader_reward", recording)
    return calls


def test_experiment_grpo_cpu_composes():
    cfg = compose_config(["experiment=grpo_cpu"])
    assert cfg.train.mode == TrainMode.grpo and not cfg.critics.enabled
    demo = compose_config([])
    assert (cfg.task, cfg.model, cfg.train.epochs) == (demo.task, demo.model, demo.train.epochs)
    # as many sampled completions per iteration as star_cpu's samples per problem
    assert cfg.train.grpo.num_generations == compose_config(["experiment=star_cpu"]).search.simulations


def test_grpo_run_has_the_loop_run_format_and_grader_rewards(debug_overrides, tmp_path, recorded,
                                                            capsys):
    run = tmp_path / "run"
    store = run_loop(compose_config(grpo_overrides(debug_overrides)), run)
    assert sorted(store.manifest["stages"]) == ["iter_000/baseline", "iter_000/eval",
                                                "iter_000/train"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    train = store.metrics(0, "train")
    assert train["mode"] == "grpo" and train["steps"] == 2 and train["completions"] == 8
    assert train["policy_dir"] == "iter_000/train/policy"  # run-relative: the run can move
    assert (run / "iter_000/train/policy/model.safetensors").is_file()
    # the demo's LoRA (debug inherits it): the adapter is merged, the policy a plain checkpoint
    assert store.manifest["config"]["train"]["lora"] is True
    assert not (run / "iter_000/train/policy/adapter_config.json").exists()
    assert store.policy_dir(1, "base") == str(run / train["policy_dir"])
    # rewards: exactly what the task's grader returned (Echo gives 0, 0.5 or 1.0)
    assert len(recorded) == 2 and all(len(c["rewards"]) == 4 for c in recorded)
    assert all(r in (0.0, 0.5, 1.0) for c in recorded for r in c["rewards"])
    history = json.loads((run / "iter_000/train/trainer/grpo/log_history.json").read_text())
    logged = [h["rewards/grader/mean"] for h in history if "rewards/grader/mean" in h]
    assert logged == pytest.approx([sum(c["rewards"]) / 4 for c in recorded])
    assert train["reward_mean"] == pytest.approx(sum(logged) / 2)
    solved = [sum(r == 1.0 for r in c["rewards"]) / 4 for c in recorded]
    assert train["solve_rate_mean"] == pytest.approx(sum(solved) / 2)
    # generated tokens: every completion token TRL sampled, EOS included, as search counts them
    assert train["tokens"] == sum(c["tokens"] for c in recorded) > 0
    assert train["tokens"] <= 8 * 6
    evaluation = store.metrics(0, "eval")
    assert evaluation["policy_dir"] == train["policy_dir"]
    assert evaluation["decodes"]["greedy"]["total"] == 4
    status = run_status(store)  # the report counts a GRPO run's own stages
    assert status["complete"] and "all 3 stages done" in status["message"]
    table = iteration_table(store)
    assert "acc:greedy" in table and f"{train['tokens']}" in table.splitlines()[-1]
    # beside an MCTS run (a manifest as that loop leaves it) in `qstar inspect RUN RUN`
    mcts = RunStore(tmp_path / "mcts")
    mcts.set_info(iterations=1, config={"train": {"mode": "dpo"}, "search": {"algorithm": "mcts"}})
    mcts.complete(0, "baseline", {"decodes": {"greedy": {"accuracy": 0.25}}}, 1.0)
    mcts.complete(0, "search", {"tokens": 11189}, 60.0)
    mcts.complete(0, "eval", {"decodes": {"greedy": {"accuracy": 0.41}}}, 1.0)
    capsys.readouterr()
    rc = main(["inspect", str(tmp_path / "mcts"), str(run)])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert rc == 0 and [r[1] for r in rows] == ["mcts", "grpo"]
    assert rows[0][2:5] == ["0.250", "0.410", "11189"]
    assert rows[1][4] == str(train["tokens"])
    # finished: a resume trains nothing again
    before = (run / "manifest.json").read_text()
    resume_run(str(run), [])
    assert (run / "manifest.json").read_text().count("iter_000/train") == before.count(
        "iter_000/train") and len(recorded) == 2


def test_trl_tokenizes_the_grpo_prompt_as_search_and_eval_do():
    """TRL renders conversational prompts itself; with SmolLM2's real tokenizer its prompt ids
    equal the ids of qstar's rendered prompt (no BOS added, same template)."""
    from pipeline.config import ModelConfig, TaskConfig
    from pipeline.lm.models import load_tokenizer, resolve_model_path
    from pipeline.tasks.prompt import task_prompts

    cfg = ModelConfig()
    tokenizer = load_tokenizer(cfg, resolve_model_path(cfg))
    for task_cfg in (TaskConfig(num_train=2, num_dev=2, num_test=2),
                     TaskConfig(kind="custom", target="examples.countdown:Countdown",
                                num_train=2, num_dev=2, num_test=2)):
        task = make_task(task_cfg)
        problems = task.split("train")
        trl_ids = tokenizer.apply_chat_template(
            conversation=[task.messages(p) for p in problems], add_generation_prompt=True,
            tokenize=True, return_dict=True)["input_ids"]
        ours = [tokenizer(t, add_special_tokens=False)["input_ids"]
                for t in task_prompts(tokenizer, task, problems)]
        assert trl_ids == ours


@pytest.mark.parametrize("override, needle", [
    ("train.grpo.num_generations=1", "train.grpo.num_generations=1 is invalid: must be >= 2"),
    ("train.batch_size=3", "train.batch_size=3 is invalid: must divide "
                           "train.grpo.prompts_per_step * num_generations = 32"),
    ("train.grpo.temperature=0", "train.grpo.temperature=0.0 is invalid: must be > 0"),
])
def test_bad_grpo_config_is_one_line(override, needle, debug_overrides, tmp_path, capsys):
    with pytest.raises(ConfigError, match=needle.replace("*", r"\*")):
        compose_config(["experiment=grpo_cpu", override])
    run = tmp_path / "run"
    rc, out, err = cli(["run", *debug_overrides, "experiment=grpo_cpu", override,
                        f"hydra.run.dir={run}"], capsys)
    assert needle in the_error_line(rc, out, err) and not run.exists()


def test_grpo_trains_on_the_iterations_window_of_problems(debug_overrides, tmp_path, monkeypatch):
    """search.problems_per_iteration=2 of 4: iteration 0 trains on problems 0-1, iteration 1 on
    2-3, as the MCTS and STaR loops search them."""
    seen = []
    real = grpo.grader_reward
    monkeypatch.setattr(grpo, "grader_reward",
                        lambda task, problems: seen.append([p.id for p in problems]) or real(
                            task, problems))
    cfg = compose_config(grpo_overrides(debug_overrides, "iterations=2", "task.num_train=4",
                                        "search.problems_per_iteration=2"))
    store = run_loop(cfg, tmp_path / "run")
    everything = [p.id for p in make_task(cfg.task).split("train")]
    assert seen == [everything[:2], everything[2:]]
    assert [store.metrics(i, "train")["problems"] for i in range(2)] == [2, 2]
    assert store.metrics(0, "train")["steps"] == 1  # 2 problems, 2 per step


def test_grpo_resumes_from_its_checkpoint_and_counts_the_steps_before(debug_overrides, tmp_path,
                                                                      recorded):
    """Killed after step 1's checkpoint: the rerun trains only step 2, and the metrics still
    count both steps' completions and tokens (TRL's checkpoint keeps its log)."""
    cfg = compose_config(grpo_overrides(debug_overrides))
    task = make_task(cfg.task)
    problems = task.split("train")
    base = str(debug_overrides[1].split("=", 1)[1])
    out = tmp_path / "train"
    recorded.kill_at = 2  # killed in step 2's sampling, after step 1's checkpoint
    with pytest.raises(KeyboardInterrupt):
        grpo.train_grpo(base, task, problems, cfg.train, out, model_cfg=cfg.model, save_steps=1)
    assert len(recorded) == 1 and (out / "trainer/grpo/checkpoint-1").is_dir()
    assert not (out / "policy").exists()
    resumed = grpo.train_grpo(base, task, problems, cfg.train, out, model_cfg=cfg.model)
    assert len(recorded) == 2  # one more generation: step 2 only
    assert resumed["steps"] == 2 and resumed["completions"] == 8
    step1 = json.loads((out / "trainer/grpo/log_history.json").read_text())[0]
    assert step1["completions/mean_length"] * 4 == pytest.approx(recorded[0]["tokens"])
    assert resumed["tokens"] == recorded[0]["tokens"] + recorded[1]["tokens"]
    assert not list((out / "trainer/grpo").glob("checkpoint-*"))
    assert (out / "policy/meta.json").is_file()


def test_token_budget_stops_after_the_step_that_reaches_it(debug_overrides, tmp_path, recorded):
    """train.grpo.token_budget: training stops after the first step whose sampled tokens reach
    the budget, before train.epochs (3 epochs = 6 steps) ends."""
    def train(budget: int, out: str) -> dict:
        cfg = compose_config(grpo_overrides(debug_overrides, "train.epochs=3",
                                            f"train.grpo.token_budget={budget}"))
        task = make_task(cfg.task)
        base = str(debug_overrides[1].split("=", 1)[1])
        return grpo.train_grpo(base, task, task.split("train"), cfg.train, tmp_path / out,
                               model_cfg=cfg.model)

    first = train(1, "one")  # any step reaches one token
    assert first["steps"] == 1 and first["token_budget"] == 1
    assert first["tokens"] == recorded[0]["tokens"] > 0
    budget = recorded[0]["tokens"] + 1  # step 1 (the same at the same seed) falls short
    second = train(budget, "two")
    assert second["steps"] == 2 and len(recorded) == 3
    assert recorded[1]["tokens"] == recorded[0]["tokens"]
    assert recorded[1]["tokens"] < budget <= second["tokens"]
    assert second["tokens"] == recorded[1]["tokens"] + recorded[2]["tokens"]


def test_grpo_token_budget_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.grpo.token_budget"):
        compose_config(["experiment=grpo_cpu", "train.grpo.token_budget=-1"])


def test_grpo_projects_only_the_completion_tokens(debug_overrides, tmp_path, recorded, monkeypatch):
    """On a CPU TRL's fused LM head would project the prompt's positions too; GRPO's loss pass
    projects the sampled completion tokens alone (test_train_stage has DPO's and SFT's)."""
    from test_train_stage import _ProjectedRows

    cfg = compose_config(grpo_overrides(debug_overrides))
    task = make_task(cfg.task)
    base = str(debug_overrides[1].split("=", 1)[1])
    spy = _ProjectedRows(monkeypatch)
    grpo.train_grpo(base, task, task.split("train"), cfg.train, tmp_path / "train",
                    model_cfg=cfg.model)
    assert sum(spy.rows) == sum(call["tokens"] for call in recorded) > 0
