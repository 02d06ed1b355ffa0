"""main_moco.py's flags: names, aliases, dests, defaults and types of the reference implementation, plus
neutral additions."""
import argparse

import pytest

import main_moco


@pytest.fixture(scope="module")
def parser():
    return main_moco.get_args_parser()


def _action(parser, dest):
    matches = [a for a in parser._actions if a.dest == dest]
    assert len(matches) == 1, dest
    return matches[0]


# (option strings, dest, default, type) of the reference implementation's command line
REFERENCE_FLAGS = [
    (["-a", "--arch"], "arch", "resnet50", None),
    (["-j", "--workers"], "workers", 32, int),
    (["--epochs"], "epochs", 200, int),
    (["--start-epoch"], "start_epoch", 0, int),
    (["-b", "--batch-size"], "batch_size", 256, int),
    (["--lr", "--learning-rate"], "lr", 0.03, float),
    (["--schedule"], "schedule", [120, 160], int),
    (["--momentum"], "momentum", 0.9, float),
    (["--wd", "--weight-decay"], "weight_decay", 1e-4, float),
    (["-p", "--print-freq"], "print_freq", 10, int),
    (["--resume"], "resume", "", str),
    (["--world-size"], "world_size", -1, int),
    (["--rank"], "rank", -1, int),
    (["--dist-backend"], "dist_backend", "nccl", str),
    (["--seed"], "seed", None, int),
    (["--gpu"], "gpu", None, int),
    (["--moco-dim"], "moco_dim", 128, int),
    (["--moco-k"], "moco_k", 65536, int),
    (["--moco-m"], "moco_m", 0.999, float),
    (["--moco-t"], "moco_t", 0.07, float),
]
REFERENCE_SWITCHES = [
    ("--multiprocessing-distributed", "multiprocessing_distributed"),
    ("--mlp", "mlp"),
    ("--aug-plus", "aug_plus"),
    ("--cos", "cos"),
]


@pytest.mark.parametrize("options, dest, default, kind", REFERENCE_FLAGS, ids=[f[1] for f in REFERENCE_FLAGS])
def test_spec_flag_names_dest_default_and_type(parser, options, dest, default, kind):
    action = _action(parser, dest)
    assert sorted(action.option_strings) == sorted(options)
    assert action.default == default
    assert type(action.default) is type(default)
    if kind is not None:
        assert action.type is kind


@pytest.mark.parametrize("option, dest", REFERENCE_SWITCHES)
def test_spec_switches_are_off_by_default(parser, option, dest):
    action = _action(parser, dest)
    assert action.option_strings == [option]
    assert action.default is False
    assert getattr(parser.parse_args(["DIR", option]), dest) is True


def test_defaults_of_a_bare_run(parser):
    args = parser.parse_args(["DIR"])
    assert args.data == "DIR"
    assert args.arch == "resnet50"
    assert args.lr == 0.03
    assert args.schedule == [120, 160]
    assert args.weight_decay == 1e-4
    assert args.workers == 32
    assert args.batch_size == 256
    assert args.epochs == 200 and args.start_epoch == 0
    assert args.momentum == 0.9
    assert args.print_freq == 10
    assert args.moco_k == 65536
    assert args.moco_m == 0.999
    assert args.moco_t == 0.07
    assert args.moco_dim == 128
    assert args.dist_backend == "nccl"
    assert args.world_size == -1 and args.rank == -1
    assert args.seed is None and args.gpu is None
    assert args.resume == ""
    assert not (args.mlp or args.aug_plus or args.cos or args.multiprocessing_distributed)


def test_positional_data_is_the_first_argument_named_DIR(parser):
    positional = [a for a in parser._actions if not a.option_strings]
    assert [a.dest for a in positional] == ["data"]
    assert positional[0].metavar == "DIR"
    assert parser.parse_args(["-a", "resnet18", "/some/where"]).data == "/some/where"


@pytest.mark.parametrize("short, long, dest, value, expected", [
    ("--lr", "--learning-rate", "lr", "0.5", 0.5),
    ("--wd", "--weight-decay", "weight_decay", "0.002", 0.002),
    ("-a", "--arch", "arch", "resnet18", "resnet18"),
    ("-j", "--workers", "workers", "3", 3),
    ("-b", "--batch-size", "batch_size", "48", 48),
    ("-p", "--print-freq", "print_freq", "7", 7),
])
def test_aliases_map_to_the_same_dest(parser, short, long, dest, value, expected):
    for option in (short, long):
        args = parser.parse_args(["DIR", option, value])
        assert getattr(args, dest) == expected
        assert type(getattr(args, dest)) is type(expected)


def test_values_are_converted_to_the_spec_types(parser):
    args = parser.parse_args(["DIR", "--schedule", "3", "7", "--moco-k", "4096", "--moco-m", "0.99",
                              "--moco-t", "0.2", "--seed", "5", "--gpu", "1", "--momentum", "0.8",
                              "--world-size", "2", "--rank", "1", "--epochs", "4", "--start-epoch", "2"])
    assert args.schedule == [3, 7]
    assert (args.moco_k, args.moco_m, args.moco_t) == (4096, 0.99, 0.2)
    assert (args.seed, args.gpu, args.momentum) == (5, 1, 0.8)
    assert (args.world_size, args.rank, args.epochs, args.start_epoch) == (2, 1, 4, 2)
    assert parser.parse_args(["DIR", "--schedule"]).schedule == []


def test_arch_choices_are_torchvision_models(parser):
    action = _action(parser, "arch")
    assert {"resnet18", "resnet50", "resnet101"} <= set(action.choices)
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["DIR", "-a", "not_a_model"])
    assert exit_info.value.code == 2


def test_dist_url_default_is_not_the_unreachable_upstream_address(parser):
    url = parser.parse_args(["DIR"]).dist_url
    assert "224.66.41.62" not in url
    assert url  # something the launcher understands ('auto')


def test_added_flags_are_off_or_neutral_by_default(parser):
    args = parser.parse_args(["DIR"])
    assert args.crop_size == 224
    assert args.bn_splits == 1
    assert args.symmetric is False
    assert args.output_dir == "."
    assert args.amp is False
    assert args.channels_last is False
    assert args.knn_freq == 0
    assert args.knn_k == 200
    assert args.knn_t == 0.1
    assert _action(parser, "crop_size").type is int
    assert _action(parser, "bn_splits").type is int
    assert _action(parser, "knn_freq").type is int


def test_added_flags_parse(parser):
    args = parser.parse_args(["DIR", "--crop-size", "32", "--bn-splits", "4", "--symmetric", "--output-dir",
                              "out", "--amp", "--channels-last", "--knn-freq", "5", "--knn-k", "20",
                              "--knn-t", "0.5"])
    assert (args.crop_size, args.bn_splits, args.symmetric, args.output_dir) == (32, 4, True, "out")
    assert (args.amp, args.channels_last) == (True, True)
    assert (args.knn_freq, args.knn_k, args.knn_t) == (5, 20, 0.5)


def test_help_renders(parser):
    text = parser.format_help()  # a stray '%' in a help string would raise here
    for option in ("--moco-k", "--learning-rate", "--weight-decay", "--crop-size", "--knn-freq",
                   "--output-dir", "--bn-splits", "--symmetric", "--amp", "--channels-last"):
        assert option in text


def test_unknown_flag_is_an_argparse_error(parser):
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["DIR", "--no-such-flag"])
    assert exit_info.value.code == 2
    assert isinstance(parser, argparse.ArgumentParser)


def test_train_and_val_must_name_the_same_classes(tmp_path):
    from moco.cli import require_same_classes
    from moco.errors import UserError
    for split, classes in (("train", ["a", "b", "c"]), ("val", ["a", "c", "d"])):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
    with pytest.raises(UserError, match=r"val/ lacks \['b'\], val/ has extra \['d'\]\); the monitor"):
        require_same_classes(str(tmp_path), "the monitor")
    (tmp_path / "val" / "d").rmdir()
    (tmp_path / "val" / "b").mkdir()
    require_same_classes(str(tmp_path), "the monitor")


def test_float_flags_beyond_float32_are_refused():
    from moco.cli import check_args
    from moco.errors import UserError
    args = main_moco.get_args_parser().parse_args(["DIR", "--lr", "1e39"])
    with pytest.raises(UserError, match=r"--lr 1e\+39 is out of range.*float32"):
        check_args(args)
    check_args(main_moco.get_args_parser().parse_args(["DIR", "--lr", "1e38"]))
