from pathlib import Path

import pytest

from paser.config import ExperimentConfig, list_presets, load_config, save_config
from paser.errors import ConfigError


def test_presets_ship_and_validate():
    assert {"battery-quick", "battery-paper"} <= set(list_presets())
    for name in list_presets():
        assert isinstance(load_config(preset=name), ExperimentConfig)


def test_paper_preset_is_the_paper_setting():
    cfg = load_config(preset="battery-paper")
    s = cfg.data.synthetic
    assert (s.height, s.width, s.n_train, s.n_val, s.n_test) == (224, 256, 1270, 20, 40)
    assert cfg.grid == (4, 4) and cfg.mc_samples == 5
    assert [cfg.models.f0.name] + [m.name for m in cfg.models.pool] == [
        "unet_tiny", "unet_small", "unet_large"]
    assert (cfg.stage1.batch_size, cfg.stage1.lr, cfg.stage1.epochs, cfg.stage1.a_kd) == (
        32, 1e-4, 200, 0.01)
    assert (cfg.stage2.epochs, cfg.stage3.epochs, cfg.stage2.lam) == (200, 200, 0.5)


def test_overrides_are_typed_and_nested():
    cfg = load_config(preset="battery-quick", overrides=[
        "stage1.epochs=3", "grid=[2, 2]", "data.root=/tmp/x", "models.pool.0.name=unet_large"])
    assert cfg.stage1.epochs == 3 and cfg.grid == (2, 2)
    assert str(cfg.data.root) == "/tmp/x"
    assert cfg.models.pool[0].name == "unet_large"


def test_an_override_that_every_model_shadows_is_named_with_the_keys_that_do_it():
    from paser.config import unread_overrides

    given = ["stage1.epochs=5", "stage1.lr=1e-3", "grid=[2, 2]"]
    cfg = load_config(preset="battery-quick", overrides=given)  # each pool model has epochs
    keys = "models.f0.epochs=5 models.pool.0.epochs=5 models.pool.1.epochs=5"
    # paser pretrain: no model reads it; paser run: MatPhase's do (its lr: everyone)
    assert unread_overrides(cfg, given, baselines=False) == [
        "stage1.epochs=5 changes nothing in this command: every model it trains sets its "
        f"own epochs (a model's own wins); for theirs give {keys}"]
    assert unread_overrides(cfg, given) == [
        "stage1.epochs=5 reaches the baselines alone: f0 and every pool model set their own "
        f"epochs (a model's own wins); for theirs give {keys}"]
    assert unread_overrides(cfg, given, pool=False) == []  # paser baselines
    gone = [*given, "baselines.matphase=null", "baselines.monolithic={}"]  # no baselines
    assert unread_overrides(load_config(preset="battery-quick", overrides=gone), gone) == [
        unread_overrides(cfg, given, baselines=False)[0]]
    given = [*given, "models.pool.1.epochs=null"]  # one model reads it: it does something
    assert unread_overrides(load_config(preset="battery-quick", overrides=given), given) == []


def test_an_override_given_to_every_model_as_well_is_not_named_again():
    from paser.config import unread_overrides

    # what the note asks for, given with stage1.epochs: nothing is left unread
    given = ["stage1.epochs=2", "models.f0.epochs=2", "models.pool.0.epochs=2",
             "models.pool.1.epochs=2"]
    cfg = load_config(preset="battery-quick", overrides=given)
    assert unread_overrides(cfg, given) == []
    assert unread_overrides(cfg, given, baselines=False) == []
    # one model left at its own: it alone is named
    given = given[:-1]
    cfg = load_config(preset="battery-quick", overrides=given)
    assert unread_overrides(cfg, given) == [
        "stage1.epochs=2 reaches the baselines alone: f0 and every pool model set their own "
        "epochs (a model's own wins); for theirs give models.pool.1.epochs=2"]
    # the pool at the value given, the baselines at their own: no model reads it, and
    # the note says so (it said 'reaches the  alone', naming no group)
    given = ["stage1.epochs=40", "baselines.matphase=null",
             "baselines.monolithic={unet: {name: unet, epochs: 3}}"]
    cfg = load_config(preset="battery-quick", overrides=given)
    assert unread_overrides(cfg, given) == [
        "stage1.epochs=40 changes nothing in this command: every model it trains sets its own "
        "epochs (a model's own wins); for theirs give baselines.monolithic.unet.epochs=40"]


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("stage1.epoch=3", "unknown key 'stage1.epoch'"),
        ("stage1.epochs=many", "key 'stage1.epochs'"),
        ("stage1.epochs=-1", "key 'stage1.epochs'"),
        ("stage2.lam=1.5", "key 'stage2.lam'"),
        ("mc_samples=0", "key 'mc_samples'"),
        ("grid=[0, 4]", "key 'grid'"),
        ("data.split=[0.5, 0.5, 0.5]", "key 'data.split'"),
        ("noequals", "expected key=value"),
        ("=5", "expected key=value"),
        ("stage1..epochs=5", "override 'stage1..epochs=5': 'stage1..epochs' has an empty name "
         "between its dots; a key is dotted names, e.g. stage2.epochs=5"),
        (".=5", "'.' has an empty name between its dots"),  # was: unknown key '(top level)'
        ("stage1.epochs.=5", "'stage1.epochs.' has an empty name between its dots"),
        ("data.split=[0.34, 0.33, 0.335]", "key 'data.split'"),  # sums to 1.005
        ("data.holdout=[0.5, 0.5]", "key 'data.holdout'"),  # nothing left to train on
        ("operating_point={budget_gflops: 1, max_tvd: 0.1}", "give at most one of"),
        ("models.pool.0.kwargs={c0:2,widths:[4,4]}", "'c0:2' reads as one key with no value; "
         "in YAML a colon needs a space after it"),
        ("models.pool.2={name: unet_small}", "'2' is not an index of a 2-item list (0..1); to "
         "add or remove items, give the whole list: models.pool=[...]"),
    ],
)
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(preset="battery-quick", overrides=[override])
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("stage1.epoch=3", "unknown key 'stage1.epoch'; did you mean 'stage1.epochs'?"),
        ("stag1.epochs=3", "unknown key 'stag1'; did you mean 'stage1'?"),
        ("stage2.lamda=0.3", "unknown key 'stage2.lamda'; did you mean 'stage2.lam'?"),
        ("models.pool.1.nme=unet", "unknown key 'models.pool.1.nme'; did you mean "
         "'models.pool.1.name'?"),
        ("data.mnist.sorce=idx", "unknown key 'data.mnist.sorce'; did you mean "
         "'data.mnist.source'?"),
        ("stage1.lam=0.2", "unknown key 'stage1.lam'; did you mean 'stage2.lam' or "
         "'stage3.lam'?"),
        ("epochs=3", "unknown key 'epochs'; did you mean 'models.f0.epochs', 'stage1.epochs', "
         "'stage2.epochs' or 'stage3.epochs'?"),
        ("training.epochs=3", "unknown key 'training'; check its spelling (`paser config "
         "--doc` lists every key)"),
    ],
)
def test_an_unknown_key_names_the_key_it_is_a_typo_of(override, said):
    with pytest.raises(ConfigError) as err:
        load_config(preset="battery-quick", overrides=[override])
    assert str(err.value) == f"preset battery-quick with overrides: {said}"


@pytest.mark.parametrize(
    ("override", "said"),
    [
        ("stage1.epochs=true", "key 'stage1.epochs': takes a number, got true"),
        ("halo=false", "key 'halo': takes a number, got false"),
        ("stage2.lr=true", "key 'stage2.lr': takes a number, got true"),
        ("stage1.class_weights=[true, 1, 1]",
         "key 'stage1.class_weights': takes a number, got [true, 1, 1]"),
    ],
)
def test_true_or_false_is_not_read_as_a_number(override, said):
    # pydantic reads true as 1 and false as 0: stage1.epochs=true trained one epoch and
    # halo=false cut patches without context, both without a word
    with pytest.raises(ConfigError) as err:
        load_config(preset="battery-quick", overrides=[override])
    assert str(err.value) == f"preset battery-quick with overrides: {said}"
    # a key that takes true / false still does
    assert load_config(preset="battery-quick",
                       overrides=["baselines.ablation=false"]).baselines.ablation is False


def test_a_second_operating_point_beside_a_presets_names_the_key_to_clear():
    # battery-quick calibrates to iou_within_top 0.005: a budget given beside it was
    # refused with 'give at most one of ...', though the user had given one
    with pytest.raises(ConfigError) as err:
        load_config(preset="battery-quick", overrides=["operating_point.budget_gflops=0.5"])
    assert str(err.value) == (
        "preset battery-quick with overrides: key 'operating_point': give at most one of "
        "iou_within_top, budget_gflops and max_tvd, got iou_within_top 0.005 and "
        "budget_gflops 0.5; set all but one to null, e.g. operating_point.iou_within_top=null")
    cfg = load_config(preset="battery-quick", overrides=[
        "operating_point.budget_gflops=0.5", "operating_point.iou_within_top=null"])
    assert (cfg.operating_point.budget_gflops, cfg.operating_point.iou_within_top) == (0.5, None)


def test_a_patch_in_pixels_sets_the_tile_the_run_routes_at(tmp_path):
    cfg = load_config(preset="battery-quick", overrides=["patch=[64, 48]", "grid=[4, 2]"])
    assert cfg.data.tile == (256, 96) and cfg.patch == (64, 48)
    save_config(cfg, tmp_path / "c.yaml")  # the saved run config has both, and agrees
    assert load_config(config_file=tmp_path / "c.yaml") == cfg
    same = load_config(preset="battery-quick", overrides=["patch=[64, 64]",
                                                          "data.tile=[128, 128]"])
    assert same.data.tile == (128, 128)
    with pytest.raises(ConfigError, match=r"^preset battery-quick with overrides: patch "
                       r"\[64, 64\] with grid \[2, 2\] is a tile of \[128, 128\], but "
                       r"data.tile is \[256, 256\]: give one of them$"):
        load_config(preset="battery-quick", overrides=["patch=[64, 64]", "data.tile=[256, 256]"])
    with pytest.raises(ConfigError, match=r"patch must be \[H, W\] in pixels, both >= 1"):
        load_config(preset="battery-quick", overrides=["patch=[0, 64]"])


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'nope'; available: .*battery-quick"):
        load_config(preset="nope")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(preset="battery-quick", overrides=["seed=7"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(config_file=tmp_path / "c.yaml") == cfg


def test_synthetic_root_depends_on_the_spec(tmp_path):
    from paser.data import synthetic_root

    a = synthetic_root(load_config(overrides=[f"data.cache_dir={tmp_path}"]).data)
    b = load_config(overrides=[f"data.cache_dir={tmp_path}", "data.synthetic.seed=1"])
    assert a.parent == tmp_path and a != synthetic_root(b.data)


def test_reference_names_the_type_and_limits_of_constrained_items():
    """A constrained item type (a class weight >= 0, an alpha in [0, 1]) reads as a YAML
    writer would give it, not as Python's `Annotated`."""
    from paser.config import reference

    rows = {line.split(" | ")[0].strip("| `"): line.split(" | ")[1]
            for line in reference().splitlines() if line.startswith("| `")}
    assert rows["stage1.class_weights"] == "list of float (>= 0) or null"
    assert rows["stage2.alpha"] == "[float (>= 0, <= 1), float (>= 0, <= 1)]"
    assert "Annotated" not in reference()


def test_a_key_given_twice_in_a_config_file_is_refused_not_dropped(tmp_path):
    # PyYAML keeps the last of two equal keys: the second stage1 section dropped epochs 3
    path = tmp_path / "c.yaml"
    path.write_text("stage1:\n  epochs: 3\nstage2:\n  lam: 0.2\nstage1:\n  lr: 0.001\n")
    with pytest.raises(ConfigError) as err:
        load_config(config_file=path)
    assert str(err.value) == (
        f"{path}: not valid YAML at line 5, column 1: key 'stage1' is given a second time in "
        "its mapping (first at line 1), which would replace the first; fix the file")
    path.write_text("stage1: {epochs: 3, lr: 0.001, epochs: 4}\n")  # in a flow mapping too
    with pytest.raises(ConfigError, match="line 1, column 32: key 'epochs' is given a second "
                       r"time in its mapping \(first at line 1\)"):
        load_config(config_file=path)
    path.write_text("stage1: {epochs: 3}\nstage2: {epochs: 3}\n")  # equal keys, two mappings
    assert load_config(config_file=path).stage2.epochs == 3


def test_an_ensemble_policy_with_reinforce_is_refused_before_stage_1_trains():
    # battery-quick's pooled router averages 5 members; REINFORCE samples from one policy,
    # which stage 2 refused once the whole of stage 1 had trained
    with pytest.raises(ConfigError) as err:
        load_config(preset="battery-quick", overrides=["stage2.objective=reinforce"])
    assert str(err.value) == (
        "preset battery-quick with overrides: stage2.members 5: an ensemble trains with full "
        "information (stage2.objective gain or expected); set stage2.members=1 for reinforce")
    one = load_config(preset="battery-quick", overrides=["stage2.objective=reinforce",
                                                         "stage2.members=1"])
    assert (one.stage2.policy, one.stage2.members) == ("pooled", 1)
    cnn = load_config(preset="battery-quick", overrides=["stage2.objective=reinforce",
                                                         "stage2.policy=cnn"])
    assert cnn.stage2.members == 5  # (the cnn policy has no members: nothing to refuse)


def test_an_override_into_a_section_the_config_leaves_null_says_it_is_null():
    # mnist-noisy has no MatPhase: the override was 'inside a value, not a section'
    with pytest.raises(ConfigError) as err:
        load_config(preset="mnist-noisy", overrides=["baselines.matphase.fusion_channels=4"])
    assert str(err.value) == (
        "override 'baselines.matphase.fusion_channels=4': baselines.matphase is null in this "
        "config, so it has no 'fusion_channels' to set; give it whole: baselines.matphase={...}"
        " (`paser config --doc` lists its keys)")
    with pytest.raises(ConfigError, match=r"^override 'data.synthetic.n_train.x=3': "
                       r"data.synthetic.n_train is a value \(240\), not a section with a 'x'$"):
        load_config(preset="battery-quick", overrides=["data.synthetic.n_train.x=3"])
    given = load_config(preset="mnist-noisy", overrides=[
        "baselines.matphase={members: [{name: unet_tiny}]}", "baselines.matphase.fusion_channels=4"])
    assert given.baselines.matphase.fusion_channels == 4


@pytest.mark.parametrize(("text", "read"), [("20261207", "int 20261207"), ("007", "int 7"),
                                            ("1.5", "float 1.5"), ("no", "bool False"),
                                            ("2026-12-07", "date 2026-12-07")])
def test_a_folder_named_as_a_number_is_told_how_to_give_it(text, read):
    """data.root=20261207 (a batch or a date) was "Input is not a valid path for <class
    'pathlib.Path'> (got 20261207)": the user's folder, read by YAML as a number, and no
    word of what to write. As ./NAME or in quotes it is the folder."""
    for key in ("data.root", "data.cache_dir", "data.mnist.root"):
        with pytest.raises(ConfigError) as err:
            load_config(overrides=[f"{key}={text}"])
        assert str(err.value).startswith(
            f"config with overrides: key '{key}': YAML reads this value as the {read}, not a "
            "folder's name; give a folder so named as ./NAME, as an absolute path, or in "
            "YAML's quotes, 'KEY=\"NAME\"' on a command line")
    assert load_config(overrides=[f"data.root=./{text}"]).data.root == Path(text)
    assert load_config(overrides=[f'data.root="{text}"']).data.root == Path(text)
    assert load_config(overrides=["data.root=null"]).data.root is None


def test_a_tilde_alone_for_a_folder_is_the_home_folder():
    """data.root=~ reached paser as YAML's null (the shell expands ~ only at a word's start
    or in a variable's assignment, and data.root is no variable), so a battery run trained
    on the synthetic set instead of the data in the home folder, without a word; ~/x was
    that folder already. A key that takes no path keeps YAML's null, and so does a key of a
    weights file (models.f0.weights=~ is no weights, as it was)."""
    for key in ("data.root", "data.cache_dir", "data.mnist.root"):
        cfg = load_config(preset="battery-quick", overrides=[f"{key}=~"])
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert node == Path("~")
    assert load_config(overrides=["data.root=~/x"]).data.root == Path("~/x")
    assert load_config(preset="battery-quick", overrides=["data.tile=~"]).data.tile is None
    assert load_config(preset="battery-quick",
                       overrides=["models.f0.weights=~"]).models.f0.weights is None
    assert load_config(overrides=["data.root=null"]).data.root is None
