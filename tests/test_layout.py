"""How the code is laid out: imports run one way, and each setting is declared once."""

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "transfer"


def import_graph():
    """{module: {transfer modules it imports}}, lazy imports inside functions included."""
    graph = {}
    for path in sorted(PACKAGE.glob("*.py")):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("transfer"):
                if node.module == "transfer":  # from transfer import check, data
                    imported |= {alias.name for alias in node.names}
                else:
                    imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[1] for alias in node.names
                             if alias.name.startswith("transfer.")}
        graph[path.stem] = imported - {path.stem}
    return graph


def cycle(graph):
    """A list of modules forming an import loop, or None."""
    state = {}

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if state.get(other) == "open":
                return path[path.index(other):] + [other] if other in path else [module, other]
            if other not in state:
                found = visit(other, path + [other])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_the_import_graph_has_no_loops():
    graph = import_graph()
    assert set(graph) >= {"cli", "pipeline", "train", "evaluate", "predict", "export", "runs"}
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_steps_below_the_pipeline_never_reach_back_into_training():
    graph = import_graph()
    for module in ("evaluate", "predict", "export", "formats", "serve", "explain", "runs"):
        assert not graph[module] & {"train", "pipeline", "cli"}, module
    assert graph["pipeline"] >= {"check", "train", "evaluate"}
    assert not any("cli" in imported for module, imported in graph.items() if module != "__main__")


def test_the_loop_finder_finds_a_loop():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_every_setting_is_an_option_with_help():
    from transfer.cli import build_parser
    from transfer.config import TrainConfig

    train = next(action for action in build_parser()._subparsers._group_actions[0].choices
                 .values() if action.prog.endswith(" train"))
    options = {option: action for action in train._actions for option in action.option_strings}
    for field in dataclasses.fields(TrainConfig):
        option = "--" + field.name.replace("_", "-")
        assert option in options, f"TrainConfig.{field.name} has no option {option}"
        action = options[option]
        assert action.dest == field.name and action.default is None
        assert field.metadata["help"] and field.metadata["help"] in action.help
        assert action.choices == field.metadata["choices"]


@pytest.mark.parametrize("argv, expected", [
    (["--epochs", "4", "--no-augment", "--flip", "vertical"],
     {"epochs": 4, "augment": False, "flip": "vertical"}),
    (["--image-size", "96", "--learning-rate", "2e-4"], {"image_size": 96, "learning_rate": 2e-4}),
])
def test_options_parse_to_the_fields_types(argv, expected):
    from transfer.cli import build_parser
    from transfer.config import field_names

    args = build_parser().parse_args(["train", *argv])
    given = {key: value for key, value in vars(args).items()
             if key in field_names() and value is not None}
    assert given == expected
    assert all(type(given[key]) is type(value) for key, value in expected.items())


def test_a_wrong_choice_names_the_valid_ones(capsys):
    from transfer.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--class-weights", "even"])
    err = capsys.readouterr().err
    assert "invalid choice: 'even' (choose from 'auto', 'balanced', 'none')" in err
