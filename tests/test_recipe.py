"""Fine-tune recipes: one source of defaults and help, the named recipes are the shipped models', --set
parses to the field types, and the library finetune() and `dydit finetune` make the same model."""
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import typer.main
from typer.testing import CliRunner

import dydit
from dydit.assets import ASSETS_DIR, default_model_path
from dydit.cli import app
from dydit.dynamic.recipe import RECIPES, Recipe, get_recipe, resolve_recipe
from dydit.io.native import read_native_config

ROOT = Path(__file__).resolve().parents[1]


def _sets(*assignments):
    return [a for s in assignments for a in ("--set", s)]


def _script_finetune_lines(text: str, command: str = "dydit finetune") -> list[list[str]]:
    """The arguments of every `dydit finetune` (or ``command``) in a shell script: its VAR="..." and
    VAR=${VAR:-default} expanded, the peft loop unrolled."""
    text = text.replace("\\\n", " ")
    env, lines = {}, []
    expand = lambda s: re.sub(r"\$([A-Za-z][A-Za-z0-9_]*)", lambda m: env[m.group(1)], s)  # noqa: E731
    for line in (part.strip() for raw in text.splitlines() for part in raw.split("; ")):
        default = re.match(r'^([A-Za-z][A-Za-z0-9_]*)=\$\{\1:-([^}]*)\}$', line)  # NAME=${NAME:-default}
        m = re.match(r'^([A-Za-z][A-Za-z0-9_]*)="?([^"]*)"?$', line)
        if default:
            env[default.group(1)] = default.group(2)
        elif m:
            env[m.group(1)] = expand(m.group(2))
        elif line.startswith(command):
            for peft in ("lora", "td-lora") if "$peft" in line else (None,):
                lines.append(shlex.split(expand(line.replace("$peft", peft) if peft else line))[2:])
    return lines



def _script_recipes_within_budget(script: str, base_command: str) -> list[dict]:
    """The resolved recipe of every `dydit finetune` in ``scripts/<script>``, each checked against the script's base
    training run (``base_command``): at most 15% of its steps, at its batch size."""
    from pathlib import Path

    from typer.testing import CliRunner

    from dydit.cli import app

    text = (Path(__file__).resolve().parents[1] / "scripts" / script).read_text()
    (train,) = _script_finetune_lines(text, base_command)
    base_steps = int(train[train.index("--steps") + 1])
    base_batch = int(train[train.index("--batch-size") + 1])
    recipes = []
    for args in _script_finetune_lines(text):
        res = CliRunner().invoke(app, ["finetune", *args, "--show-recipe"])
        assert res.exit_code == 0, (args, res.output)
        recipe = json.loads(res.output)
        assert recipe["optim"]["steps"] <= 0.15 * base_steps and recipe["optim"]["batch_size"] == base_batch, args
        recipes.append(recipe)
    return recipes

@pytest.mark.parametrize("lam", ["0.5", "0.7"])
def test_shipped_model_carries_the_recipe_its_name_resolves_to(lam):
    folder = ASSETS_DIR / f"fmnist_dydit_{lam}"
    cfg = read_native_config(folder)
    recipe = resolve_recipe(f"fmnist-{lam}")
    assert recipe.to_dict() == cfg["recipe"] and recipe.target == float(lam)
    dyn = cfg["dynamic"]  # the routers the model has are the ones the recipe builds
    assert (dyn["width"], dyn["tokens"], dyn["width_bias_init"], dyn["token_bias_init"]) == (
        recipe.routing.width, recipe.routing.tokens, recipe.router_init.width_bias, recipe.router_init.token_bias)
    assert dydit.load(folder).dynamic_config.tokens == recipe.routing.tokens  # loading ignores the metadata
    assert get_recipe(folder) == recipe  # --recipe also takes a model folder
    res = CliRunner().invoke(app, ["finetune", "base", "--recipe", f"fmnist-{lam}", "--show-recipe"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == cfg["recipe"]


def test_results_script_fine_tunes_resolve_and_the_shipped_ones_use_their_recipes():
    text = (ROOT / "scripts" / "fmnist_results.sh").read_text()
    recipes = {}
    for args in _script_finetune_lines(text):
        res = CliRunner().invoke(app, ["finetune", *args, "--show-recipe"])
        assert res.exit_code == 0, (args, res.output)
        recipes[args[args.index("--out") + 1]] = (args, json.loads(res.output))
    assert len(recipes) >= 25
    shipped = dict((lam, run) for run, lam in re.findall(r"cp -r (runs/\S+)/ema \$A/fmnist_dydit_(0\.\d)", text))
    assert sorted(shipped) == ["0.5", "0.7"]
    for lam, run in shipped.items():
        args, recipe = recipes[run]
        assert args[args.index("--recipe") + 1] == f"fmnist-{lam}"
        assert recipe == read_native_config(ASSETS_DIR / f"fmnist_dydit_{lam}")["recipe"]


def test_set_parses_values_to_the_field_types():
    base = Recipe()
    r = base.with_sets(["flops.weight=3", "optim.steps=7", "routing.tokens=false", "feedback.sampler=ddpm",
                        "optim.router_lr=none", "peft.targets=attn.qkv, mlp.fc1", "freeze.time_embed=TRUE"])
    assert r.flops.weight == 3.0 and isinstance(r.flops.weight, float)
    assert r.optim.steps == 7 and r.routing.tokens is False and r.feedback.sampler == "ddpm"
    assert r.optim.router_lr is None and r.peft.targets == ["attn.qkv", "mlp.fc1"] and r.freeze.time_embed is True
    assert base == Recipe()  # a copy: the recipe it started from is unchanged
    for bad, msg in (("optim.steps=1.5", "integer"), ("routing.tokens=maybe", "true or false"),
                     ("flops.weight=none", "a number"), ("flops.weight", "key=value")):
        with pytest.raises(ValueError, match=msg):
            base.with_sets([bad])


def test_unknown_key_is_one_line_naming_the_closest_keys(tmp_path):
    with pytest.raises(ValueError, match="closest: flops.weight"):
        Recipe().with_sets(["flops.weigth=2"])
    with pytest.raises(ValueError, match="section.*flops.weight"):
        Recipe().with_sets(["flops=2"])
    out = tmp_path / "ft"
    res = CliRunner().invoke(app, ["finetune", str(default_model_path()), "--out", str(out),
                                   "--set", "freeze_routers=0.5"])  # the old flag's name
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and "freeze.routers" in lines[0], res.output
    assert not out.exists()  # refused before anything ran
    res = CliRunner().invoke(app, ["finetune", "base", "--steps", "3", "--set", "optim.steps=4", "--show-recipe"])
    assert res.exit_code == 2 and "optim.steps" in res.output


def test_contradictory_settings_name_the_keys():
    for sets, msg in ((["freeze.time_embed=true"], "freeze.routers"), (["freeze.calibrate=true"], "freeze.routers"),
                      (["prune_static=true", "peft.method=lora"], "peft.method=none"),
                      (["routing.width=false", "routing.tokens=false"], "nothing to route"),
                      (["flops.balance=1", "flops.stratified=false"], "flops.stratified"),
                      (["optim.lr_schedule=linear"], "optim.lr_schedule"), (["target=1.5"], "target"),
                      (["peft.method=td-lora", "peft.experts=0"], "expert")):
        with pytest.raises(ValueError, match=msg):
            Recipe().with_sets(sets).validate()


def test_named_recipes_validate_and_round_trip_through_a_file(tmp_path):
    for name in RECIPES:
        recipe = get_recipe(name).validate()
        path = tmp_path / f"{name}.json"
        path.write_text(recipe.to_json())
        assert get_recipe(path) == recipe
    paper = get_recipe("paper")  # METHOD.md §2 and §4
    assert (paper.router_init.width_bias, paper.router_init.token_bias, paper.flops.weight, paper.optim.lr,
            paper.optim.batch_size, paper.optim.ema_decay) == (15.0, 35.0, 2.0, 1e-4, 256, 0.9999)
    partial = tmp_path / "partial.json"
    partial.write_text('{"target": 0.6, "flops": {"weight": 1}}')
    r = get_recipe(partial)
    assert r.target == 0.6 and r.flops.weight == 1.0 and r.optim == Recipe().optim
    bad = tmp_path / "bad.json"
    bad.write_text('{"flops": {"weigth": 1}}')
    with pytest.raises(ValueError, match="bad.json.*flops.weight"):
        get_recipe(bad)
    with pytest.raises(ValueError, match="fmnist-0.5"):
        get_recipe("fmnist-05")


def test_every_key_has_help_and_the_command_defaults_are_the_default_recipe():
    assert all(Recipe.help(k) for k in Recipe.keys())
    res = CliRunner().invoke(app, ["finetune", "base", "--show-recipe"])
    assert json.loads(res.output) == Recipe().to_dict() == get_recipe("default").to_dict()
    res = CliRunner().invoke(app, ["recipes", "--keys"])
    assert res.exit_code == 0 and len(res.output.strip().splitlines()) == len(Recipe.keys())
    assert f"flops.weight (float, default 2.0): {Recipe.help('flops.weight')}" in res.output
    res = CliRunner().invoke(app, ["recipes"])
    assert all(name in res.output for name in RECIPES)
    res = CliRunner().invoke(app, ["recipes", "fmnist-0.5", "--set", "optim.seed=2"])
    assert json.loads(res.output) == get_recipe("fmnist-0.5").replace(**{"optim.seed": 2}).to_dict()


def test_finetune_help_lists_at_most_25_options():
    cmd = typer.main.get_command(app).commands["finetune"]
    options = [p for p in cmd.params if p.param_type_name == "option"]
    names = {name for p in options for name in p.opts}
    count = len(options) + 1  # + --help
    assert count <= 25, sorted(names)
    assert {"--out", "--recipe", "--set", "--target", "--steps", "--batch-size", "--lr", "--seed", "--data",
            "--resume", "--stop-after", "--ckpt-every", "--sample-every", "--limit-data", "--threads", "--bf16",
            "--peft", "--show-recipe"} <= names


def test_python_finetune_and_the_cli_make_the_same_model(tmp_path):
    sets = ["optim.steps=3", "optim.batch_size=8", "optim.seed=3", "flops.ramp_steps=1", "warmup.steps=1",
            "feedback.every=2", "feedback.images=2", "feedback.steps=2", "calibration.images=2"]
    recipe = get_recipe("fmnist-0.7").with_sets(sets).replace(target=0.8)
    result = dydit.finetune(default_model_path(), tmp_path / "py", recipe, limit_data=16, ckpt_every=3,
                            progress=False)
    res = CliRunner().invoke(app, ["finetune", str(default_model_path()), "--out", str(tmp_path / "cli"),
                                   "--recipe", "fmnist-0.7", "--target", "0.8", *_sets(*sets),
                                   "--limit-data", "16", "--ckpt-every", "3"])
    assert res.exit_code == 0, res.output
    assert result.finished and result.weights == tmp_path / "py" / "ema"
    a, b = dydit.load(tmp_path / "py" / "ema").state_dict(), dydit.load(tmp_path / "cli" / "ema").state_dict()
    assert any("token_selection" in k for k in a)  # routers with a random init are part of it
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.mlp.fc1.weight"], dydit.load(default_model_path()).state_dict()[
        "blocks.0.mlp.fc1.weight"])  # it trained
    for out in ("py", "cli"):  # the recipe is saved with the model and in finetune.json
        assert read_native_config(tmp_path / out / "ema")["recipe"] == recipe.to_dict()
        summary = json.loads((tmp_path / out / "finetune.json").read_text())
        assert summary["recipe"] == recipe.to_dict() and "calibration" in summary
    assert result.summary["calibration"] == result.calibration.to_dict()

    # `dydit calibrate` keeps the recipe in its copy of the model
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "py" / "ema"), "--target", "0.8", "--out",
                                   str(tmp_path / "cal"), "--steps", "2", "--num-images", "2", "--tol", "0.5"])
    assert res.exit_code == 0, res.output
    assert read_native_config(tmp_path / "cal")["recipe"] == recipe.to_dict()


def test_save_keeps_metadata_apart_from_the_model_keys(tmp_path):
    model = dydit.load(default_model_path())
    with pytest.raises(ValueError, match="model"):
        dydit.save(model, tmp_path / "m", extra_config={"model": {}})
    dydit.save(model, tmp_path / "m", extra_config={"recipe": Recipe().to_dict()})
    assert torch.equal(dydit.load(tmp_path / "m").pos_embed, model.pos_embed)
    assert get_recipe(tmp_path / "m") == Recipe()
