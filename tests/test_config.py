import pytest

from multitask.config import ConfigError, dump_config, load_config


def test_defaults_and_dotted_overrides():
    cfg = load_config(None, ["train.lr=3e-4", "model.sharing=separate", "data.img_size=[32, 24]", "heads=class"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.sharing == "separate"
    assert cfg.data.img_size == (32, 24)
    assert cfg.heads == "class"


@pytest.mark.parametrize("name", ["demo", "competition"])
def test_other_heads_than_a_config_files_keep_only_the_losses_of_their_heads(name):
    """`mt train --config demo --heads class`: the file's losses are for its own three heads, and
    those of heads the command no longer has are left out (they used to stop the command)."""
    from multitask.context import build_task

    full = load_config(name)
    assert set(full.losses) == {"mask", "gender", "age"}
    assert load_config(name, ["heads=class"]).losses == {}
    kept = load_config(name, ["heads=mask,gender_age"])
    assert set(kept.losses) == {"mask"} and kept.losses["mask"] == full.losses["mask"]
    build_task(kept)
    # a loss the command itself sets for a head it does not have is still a mistake to report
    with pytest.raises(ConfigError, match=r"losses given for \['age'\]"):
        build_task(load_config(name, ["heads=class", "losses.age.name=ce"]))


def test_a_table_given_without_its_task_says_what_it_needs(tmp_path):
    table = tmp_path / "train.csv"
    table.write_text("path,age\na.jpg,3\n")
    with pytest.raises(ConfigError, match="train.csv: a file, and the task is the competition's.*--config that names its factors"):
        load_config(None, data=table)
    with pytest.raises(ConfigError, match="a table needs a --config"):
        load_config("demo", data=table)


def test_train_options_are_overrides_that_set_comes_after():
    from multitask.config import train_overrides

    options = train_overrides(heads="mask,gender_age", sharing="separate", folds=3, fold=[0, 2], epochs=4, jobs=2,
                              skip_bad=True, time_limit_s=90.0)
    cfg = load_config(None, options)
    assert (cfg.heads, cfg.model.sharing, cfg.train.folds, cfg.train.fold, cfg.train.epochs, cfg.train.jobs,
            cfg.data.skip_bad, cfg.train.time_limit_s) == ("mask,gender_age", "separate", 3, [0, 2], 4, 2, True, 90.0)
    assert train_overrides() == []  # an option not given leaves the config's value
    assert load_config(None, train_overrides(epochs=4) + ["train.epochs=6"]).train.epochs == 6


def test_yaml_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  epochs: 3\n  lr: 0.01\nlosses:\n  age: {name: focal, gamma: 1.5}\n")
    cfg = load_config(p, ["train.epochs=7"])
    assert cfg.train.epochs == 7 and cfg.train.lr == 0.01
    assert cfg.loss_for("age").name == "focal" and cfg.loss_for("mask").name == "ce"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("demo", ["train.seed=5"])
    p = tmp_path / "resolved.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.lrr=1"], "train.lrr: Extra inputs are not permitted"),
    (["train.epochs=0"], "train.epochs"),
    (["train.seed=-1"], "train.seed: Input should be greater than or equal to 0"),  # numpy refuses it mid-run
    (["train.fold_seed=-1"], "train.fold_seed"),
    (["model.sharing=both"], "model.sharing"),
    (["losses.mask.name=hinge"], "losses.mask.name"),
    (["train.fold=[7]"], "fold \\[7\\] out of range"),
    (["train.fold=[]"], "fold \\[\\] trains nothing"),
    (["data.age_bins=[60, 30]"], "increasing"),
    (["noequals"], "not key=value"),
    (["data.img_size=[32"], "override 'data.img_size=\\[32': the value is not valid YAML"),
    (["data.img_size=[0, 32]"], "data.img_size.0: Input should be greater than 0"),
    (["data.img_size=[32, -4]"], "data.img_size.1"),
    # the seeds derived per fold and epoch would overflow numpy's 64 bits mid-run; scikit-learn's split takes 32
    (["train.seed=4294967296"], "train.seed: Input should be less than 4294967296"),
    (["train.fold_seed=4294967296"], "train.fold_seed"),
    (["train.batch_size=1"], "train.batch_size: Input should be greater than or equal to 2"),  # BatchNorm, mid-run
    # the torch backend divides its sampling grid by the zoom: 0 was an infinite grid, a negative one a mirror
    (["aug.torch.scale=[0, 1]"], r"aug.torch.scale: scale \[0.0, 1.0\] must be \(low, high\) with 0.05 <= low"),
    (["aug.torch.scale=[-1, 1]"], "aug.torch.scale"),
    (["aug.torch.scale=[1.2, 0.9]"], "aug.torch.scale"),
    # a one-sided bound below 0.5 lies above the precision it bounds: it would loosen the cut it is to tighten
    (["pseudo.bound=0.3"], "pseudo.bound: .*bound 0.3 must be 0 \\(none\\) or a level from 0.5 up to 1"),
    (["pseudo.bound=1"], "pseudo.bound: Input should be less than 1"),
])
def test_bad_config_is_a_clear_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    # PyYAML keeps the last of two equal keys: a second `train:` dropped the first's settings unsaid
    p.write_text("train:\n  epochs: 4\n  lr: 0.01\nmodel:\n  backbone: resnet10t\ntrain:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML: key 'train' is given twice(.|\n)*line 6"):
        load_config(p)
    p.write_text("train:\n  epochs: 4\n  epochs: 3\n")
    with pytest.raises(ConfigError, match="key 'epochs' is given twice"):
        load_config(p)
    p.write_text("train:\n  epochs: 4\n  lr: 0.01\nmodel:\n  backbone: resnet10t\n")
    assert (load_config(p).train.epochs, load_config(p).train.lr) == (4, 0.01)


def test_a_config_file_that_cannot_be_read_names_the_file(tmp_path, monkeypatch):
    p = tmp_path / "latin.yaml"
    p.write_bytes("train: {epochs: 3}  # \u00e9t\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="latin.yaml: not UTF-8 text"):
        load_config(p)
    # a folder named like a preset (after `mt demo --out demo`) is not the preset's file
    (tmp_path / "demo").mkdir()
    monkeypatch.chdir(tmp_path)
    assert load_config("demo").model.backbone == "test_efficientnet"


def test_relative_data_paths_come_out_absolute(tmp_path, monkeypatch):
    """config.yaml keeps them so: `mt submit` and `mt resume` from another folder read the same data.
    In a YAML file they are relative to its folder, as a table task's table is."""
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "c.yaml").write_text("data_root: data\ndata: {cache_dir: cache}\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(tmp_path / "cfgs" / "c.yaml")
    assert (cfg.data_root, cfg.data.cache_dir) == (str(tmp_path / "cfgs" / "data"), str(tmp_path / "cfgs" / "cache"))
    cfg = load_config(None, ["data_root=data", "data.cache_dir=cache"])
    assert (cfg.data_root, cfg.data.cache_dir) == (str(tmp_path / "data"), str(tmp_path / "cache"))


def error_of(overrides) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    return str(e.value)


def test_an_error_names_only_the_override_that_caused_it():
    # a field's error names the --set of that field, or of a section holding it
    assert "[from --set train.lr=-1]" in error_of(["train.lr=-1", "train.epochs=3"])
    assert "[from --set train={lr: -1}]" in error_of(["train={lr: -1}"])
    assert "[from --set train.lrr=1]" in error_of(["train.epochs=3", "train.lrr=1"])
    # a section's own check (fold against folds) cannot tell which of its fields is wrong: a --set
    # beside the bad one must not take the blame
    message = error_of(["train.fold=[7]", "train.lr=0.01"])
    assert "fold [7] out of range" in message and "[from --set" not in message
    assert "[from --set" not in error_of(["train.folds=1", "model.sharing=separate"])  # the whole config's check
    # which has no key of its own to name: its line is the message, not ": Value error, ..."
    assert error_of(["train.folds=1"]).splitlines()[1] == "  train.folds must be at least 2 (k-fold training)"


def test_a_local_checkpoint_path_comes_out_absolute(tmp_path, monkeypatch):
    # config.yaml keeps it so: `mt resume` from another folder finds the same file
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "c.yaml").write_text("model: {checkpoint: w.pth}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["model.checkpoint=w.pth"]).model.checkpoint == str(tmp_path / "w.pth")
    assert load_config(tmp_path / "cfgs" / "c.yaml").model.checkpoint == str(tmp_path / "cfgs" / "w.pth")
    assert load_config(None).model.checkpoint is None


def test_the_demo_config_takes_any_folder_name(tmp_path):
    from multitask.demo import demo_config

    out = tmp_path / "my demo #1: try"  # YAML would read " #" as a comment and ": " as a mapping
    cfg = demo_config(out, ["train.seed=3"])
    assert cfg.data_root == str((out / "data").resolve()) and cfg.data.cache_dir == str(out / "cache")
    assert cfg.train.seed == 3


def test_a_numeric_factors_settings_are_laid_over_every_factors(tmp_path):
    from multitask.numeric import settings_of

    # one setting changed: the built-in auxiliary head stays (it was lost when the override made
    # a mapping of that factor alone)
    cfg = load_config(None, ["numeric.age.soft_edge=3"])
    assert settings_of(cfg, "age").aux == "regression" and settings_of(cfg, "age").soft_edge == 3
    assert settings_of(load_config(None, ["numeric.age.aux=none"]), "age").aux == "none"  # said outright
    assert load_config(None, ["numeric={}"]).numeric == {}  # none at all
    path = tmp_path / "c.yaml"
    path.write_text("numeric:\n  '*': {aux: ordinal, aux_weight: 0.5}\n  age: {soft_edge: 2}\n")
    age = settings_of(load_config(path), "age")
    assert (age.aux, age.aux_weight, age.soft_edge) == ("ordinal", 0.5, 2)
    # written out whole: the run read back from its config.yaml has the same settings
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_config(load_config(path)))
    assert settings_of(load_config(saved), "age") == age


def test_an_error_of_an_option_names_the_option_not_a_set(tmp_path):
    from multitask.config import train_overrides

    message = error_of(train_overrides(epochs=0) + ["train.lr=0.01"])
    assert "[from --epochs]" in message and "--set train.epochs" not in message
    assert "with options" in message
    import copy
    import pickle

    option = train_overrides(epochs=3)[0]
    assert pickle.loads(pickle.dumps(option)).option == copy.deepcopy(option).option == "--epochs"
    assert "[from --set train.lr=-1]" in error_of(train_overrides(epochs=3) + ["train.lr=-1"])


def test_a_fold_named_twice_is_trained_once_and_nan_and_inf_are_refused():
    # twice, the time limit counted it twice; refused, an older run's config.yaml holding it would not open
    assert load_config(None, ["train.fold=[1, 3, 1]"]).train.fold == [1, 3]
    assert "train.lr" in error_of(["train.lr=.inf"])
    assert "task.factors.0.bins" in error_of(['task={table: t.csv, factors: [{name: a, column: a, bins: [30, .nan]}]}'])


def test_a_table_tasks_error_leaves_out_the_other_member_of_the_union():
    message = error_of(["task={table: t.csv}"])
    assert "task.factors: Field required" in message and "'mask'" not in message


def test_yaml_merge_keys_are_read_and_keys_after_them_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base: &b {lr: 0.01, epochs: 2}\ntrain:\n  <<: *b\n  epochs: 3\n".replace("base: &b", "x-base: &b"))
    with pytest.raises(ConfigError, match="x-base"):  # an unknown top key is still refused, by the schema
        load_config(path)
    path.write_text("train:\n  <<: {lr: 0.01, epochs: 2}\n  epochs: 3\n")
    cfg = load_config(path)
    assert (cfg.train.lr, cfg.train.epochs) == (0.01, 3)
    path.write_text("train:\n  <<: {lr: 0.01}\n  <<: {epochs: 2}\n")  # one mapping, one merge key
    with pytest.raises(ConfigError, match="given twice"):
        load_config(path)


def test_a_home_folder_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path / "..")
    cfg = load_config(None, ["data.cache_dir=~/cache", "model.checkpoint=~/w.pt"], data="~/data")
    assert (cfg.data.cache_dir, cfg.model.checkpoint) == (str(tmp_path / "cache"), str(tmp_path / "w.pt"))
    assert cfg.data_root == str(tmp_path / "data")
    # `~name` is a folder's name, not another user's home (which may not even be known)
    assert load_config(None, ["data.cache_dir=~nosuchuser/c"]).data.cache_dir == str(tmp_path.parent / "~nosuchuser" / "c")
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "c.yaml").write_text("data:\n  cache_dir: ~/c2\n")
    assert load_config(tmp_path / "conf" / "c.yaml").data.cache_dir == str(tmp_path / "c2")


def test_a_time_limit_of_nothing_is_refused():
    from multitask.budget import parse_duration

    assert parse_duration("1h30m") == 5400
    for text in ("0", "0s", "0m0s", ""):
        with pytest.raises(ConfigError):
            parse_duration(text)


def test_an_unknown_key_is_matched_first_within_its_own_section():
    # sections under a union or a mapping (task, numeric.<factor>, losses.<head>, decide.subjects)
    # had no suggestion, or the section itself
    assert "(did you mean numeric.age.soft_edge?)" in error_of(["numeric.age.soft_edg=3"])
    assert "(did you mean decide.subjects.anchor?)" in error_of(["decide.subjects={anchr: mask=not_worn}"])
    assert "(did you mean task.factors?)" in error_of(["task={table: t.csv, factor: []}"])
    assert "(did you mean data.img_size?)" in error_of(["train.img_size=[64, 64]"])  # another section's key


def test_a_number_with_a_leading_zero_is_not_read_as_octal_silently():
    assert "as octal (8)" in error_of(["train.seed=010"])
    assert load_config(None, ["train.seed=10"]).train.seed == 10
    assert load_config(None, ["train.seed=0"]).train.seed == 0  # a lone 0 is 0
