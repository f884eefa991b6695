"""Static checks of the Slicer side (no Slicer app needed): module files parse and stay thin, the CMake file
lists match the tree, every widget the code uses exists in its .ui file, and every parameter-node field is bound
to a widget of a matching kind (``SlicerParameterName``) and mirrors the VoCoSlicerLib params dataclasses."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import fields
from pathlib import Path

import pytest

from VoCoSlicerLib import params

ROOT = Path(__file__).resolve().parent.parent
MODULES = {  # module file -> its .ui file
    "VoCoSlicer": ROOT / "VoCoSlicer" / "Resources" / "UI" / "VoCoSlicer.ui",
    "VoCoSegment": ROOT / "VoCoSegment" / "Resources" / "UI" / "VoCoSegment.ui",
    "VoCoPretrain": ROOT / "VoCoPretrain" / "Resources" / "UI" / "VoCoPretrain.ui",
}
MODULE_FILES = {name: ROOT / name / f"{name}.py" for name in MODULES}
# which widget class may carry a parameter of which (unannotated) type, as Slicer's GUI connectors allow
WIDGET_FOR_TYPE = {"bool": {"QCheckBox", "QPushButton"}, "int": {"QSpinBox", "QSlider"},
                   "float": {"QDoubleSpinBox", "ctkSliderWidget"}, "str": {"QLineEdit", "QComboBox", "QTextEdit"},
                   "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"}}


def _tree(name: str) -> ast.Module:
    return ast.parse(MODULE_FILES[name].read_text(encoding="utf-8"), filename=str(MODULE_FILES[name]))


def _ui_widgets(ui: Path) -> dict[str, tuple[str, str | None]]:
    """objectName -> (class, SlicerParameterName or None) of every widget in a .ui file."""
    out = {}
    for w in ET.parse(ui).getroot().iter("widget"):
        pname = None
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                pname = prop.findtext("string")
        out[w.get("name")] = (w.get("class"), pname)
    return out


def _wrapper_fields(tree: ast.Module) -> dict[str, str]:
    """Field name -> annotation source of the @parameterNodeWrapper class."""
    for node in tree.body:
        decorators = [ast.unparse(d) for d in getattr(node, "decorator_list", [])]
        if isinstance(node, ast.ClassDef) and "parameterNodeWrapper" in decorators:
            return {s.target.id: ast.unparse(s.annotation) for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("no @parameterNodeWrapper class")


def _set_by_code(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PARAMETERS_SET_BY_CODE":
            return set(ast.literal_eval(node.value))
    return set()


def _base_type(annotation: str) -> str:
    m = re.match(r"Annotated\[([\w.]+)", annotation)
    return m.group(1) if m else annotation


@pytest.mark.parametrize("name", list(MODULES))
def test_module_file_parses_and_is_thin(name):
    tree = _tree(name)
    classes = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    assert {name, f"{name}Widget", f"{name}Logic", f"{name}Test"} <= classes
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"torch", "monai", "vocoslicer", "SimpleITK"}, "heavy imports in the Slicer process"
    assert len(MODULE_FILES[name].read_text().splitlines()) <= 500


def _imported_modules(nodes) -> set[str]:  # noqa: ANN001 - ast nodes
    out = {a.name for n in nodes if isinstance(n, ast.Import) for a in n.names}
    return out | {n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.module and not n.level}


def test_vocoslicerlib_never_imports_qt_or_torch_at_module_level():
    for path in sorted((ROOT / "VoCoSlicer" / "VoCoSlicerLib").glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {m.split(".")[0] for m in _imported_modules(tree.body) if not m.startswith("vocoslicer.contracts")}
        assert not top & {"qt", "ctk", "torch", "monai", "vocoslicer", "PySide6"}, path.name
        assert len(path.read_text().splitlines()) <= 500, path.name


def test_vocoslicerlib_imports_only_the_contracts_of_the_engine():
    """Anywhere in a file, at any depth: the engine's stdlib-only contracts, nothing else of it."""
    for path in sorted((ROOT / "VoCoSlicer" / "VoCoSlicerLib").glob("*.py")):
        engine = {m for m in _imported_modules(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
                  if m.split(".")[0] == "vocoslicer"}
        allowed = all(m == "vocoslicer.contracts" or m.startswith("vocoslicer.contracts.") for m in engine)
        assert allowed, (path.name, sorted(engine))


def test_contracts_import_only_the_standard_library_and_each_other():
    for path in sorted((ROOT / "VoCoSlicer" / "vocoslicer" / "contracts").glob("*.py")):
        mods = _imported_modules(ast.walk(ast.parse(path.read_text(encoding="utf-8"))))
        foreign = {m for m in mods if m.split(".")[0] not in sys.stdlib_module_names
                   and not m.startswith("vocoslicer.contracts.") and m != "__future__"}
        assert not foreign, (path.name, sorted(foreign))


def test_cmake_file_lists_match_the_tree():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "update_cmake_lists.py"), "--check"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, "run scripts/update_cmake_lists.py:\n" + out.stderr


def test_cmake_layout():
    top = (ROOT / "CMakeLists.txt").read_text()
    assert "project(VoCoSlicer)" in top and re.search(r'EXTENSION_DEPENDS\s+"PyTorch"', top)
    order = [top.index(f"add_subdirectory({m})") for m in MODULES]
    assert order == sorted(order) and top.index("## NEXT_MODULE") > order[-1]
    for name in MODULES:
        text = (ROOT / name / "CMakeLists.txt").read_text()
        assert f"set(MODULE_NAME {name})" in text and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
        assert (ROOT / name / "Testing" / "Python" / "CMakeLists.txt").is_file()
        assert (ROOT / name / "Resources" / "Icons" / f"{name}.png").is_file()


@pytest.mark.parametrize("name", list(MODULES))
def test_every_ui_widget_used_exists(name):
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE_FILES[name].read_text()))
    widgets = _ui_widgets(MODULES[name])
    assert used, "the widget uses no .ui widgets?"
    assert not used - set(widgets), f"not in {MODULES[name].name}: {sorted(used - set(widgets))}"


@pytest.mark.parametrize("name", list(MODULES))
def test_parameter_node_fields_are_bound_to_matching_widgets(name):
    tree = _tree(name)
    wrapper = _wrapper_fields(tree)
    by_param = {p: (w, cls) for w, (cls, p) in _ui_widgets(MODULES[name]).items() if p}
    by_code = _set_by_code(tree)
    assert by_code <= set(wrapper)
    assert set(by_param) == set(wrapper) - by_code, "fields without widget / widgets without field"
    for field_name, (widget, cls) in by_param.items():
        base = _base_type(wrapper[field_name])
        if base.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", field_name
        elif base == "str" and cls == "QComboBox":
            assert "Choice(" in wrapper[field_name], f"{field_name}: a QComboBox binding needs Choice([...])"
        else:
            assert cls in WIDGET_FOR_TYPE[base], f"{field_name}: {base} cannot bind to {cls} ({widget})"
        if cls in ("QSpinBox", "QDoubleSpinBox", "QSlider"):
            assert "WithinRange(" in wrapper[field_name], f"{field_name}: give the numeric field a WithinRange"


def test_parameter_nodes_mirror_the_params_dataclasses():
    segment = set(_wrapper_fields(_tree("VoCoSegment")))
    for cls in (params.SegmentParams, params.CohortParams):
        assert {f.name for f in fields(cls)} <= segment, cls.__name__
    finetune = {f.name for f in fields(params.FinetuneParams)} - {"baseModel"}  # base model = the selected model
    assert finetune <= segment
    assert set(_wrapper_fields(_tree("VoCoPretrain"))) == {f.name for f in fields(params.PretrainParams)}


def test_choices_match_the_params_module():
    seg = _wrapper_fields(_tree("VoCoSegment"))
    assert ast.literal_eval(re.search(r"Choice\((\[.*?\])\)", seg["device"]).group(1)) == list(params.DEVICES)
    pre = MODULE_FILES["VoCoPretrain"].read_text()
    assert "Choice(list(PRETRAIN_METHODS))" in pre and "Choice(list(MODEL_SIZES))" in pre
    assert set().union(*params.PRETRAIN_SIZES.values()) == set(params.MODEL_SIZES)


@pytest.mark.parametrize("ui", list(MODULES.values()), ids=list(MODULES))
def test_ui_files_are_valid_and_declare_their_custom_widgets(ui):
    root = ET.parse(ui).getroot()
    assert root.tag == "ui" and root.find("widget").get("class") == "qMRMLWidget"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    custom = {c for c in used if c.startswith(("qMRML", "ctk", "qSlicer"))}
    assert custom <= declared, f"undeclared custom widgets: {custom - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"
    for conn in root.iter("connection"):  # scene propagation to every MRML widget
        assert conn.findtext("receiver") in names
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class") in ("qMRMLNodeComboBox",
                                                                              "qMRMLSegmentEditorWidget")}
    assert mrml == {c.findtext("receiver") for c in root.iter("connection")
                    if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}


# ------------------------------------------------------------------------------------------------- issue 12
def _functions(tree: ast.Module) -> dict[str, ast.FunctionDef]:
    return {f.name: f for c in tree.body if isinstance(c, ast.ClassDef) for f in c.body
            if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("name", list(MODULES))
def test_module_file_is_under_300_lines_and_guards_the_version_first(name):
    text = MODULE_FILES[name].read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    tree = ast.parse(text, feature_version=(3, 7))  # parses as old Python: the guard can run and say why
    body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert ast.unparse(body[0]) == "import sys"
    assert ast.unparse(body[1]) == "from VoCoSlicerLib.compat import unsupported_message"
    assert isinstance(body[2], ast.If) and "unsupported_message(sys.version_info)" in ast.unparse(body[2].test)
    assert any(isinstance(n, ast.Raise) for n in ast.walk(body[2]))


@pytest.mark.parametrize("name", list(MODULES))
def test_timer_paths_neither_rewrite_the_log_nor_nest_error_dialogs(name):
    text = MODULE_FILES[name].read_text(encoding="utf-8")
    assert "setPlainText" not in text, "append new log lines (module_support.LogFollower)"
    funcs = _functions(_tree(name))
    tick = [funcs["_onTimer"], funcs["_updateGUI"]]
    tick += [funcs[m.group(1)] for m in re.finditer(r"on_finished=self\.(\w+)", text)]
    for f in tick:
        src = ast.unparse(f)
        assert "tryWithErrorDisplay" not in src, f"{f.name}: runs inside the timer tick (TimerTick reports once)"
    assert "self._tick(" in ast.unparse(funcs["_onTimer"])


def test_python_for_jobs_is_no_scene_parameter_and_is_loaded_before_it_is_watched():
    widgets = _ui_widgets(MODULES["VoCoSlicer"])
    assert widgets["pythonPathLineEdit"][1] is None, "bound to the parameter node: connectGui writes '.' into it"
    assert "pythonExecutable" not in _wrapper_fields(_tree("VoCoSlicer"))
    setup = ast.unparse(_functions(_tree("VoCoSlicer"))["setup"])
    assert setup.index("pythonPathLineEdit.currentPath =") < setup.index("currentPathChanged")
    assert "pythonResetButton" in widgets


def test_segment_panel_follows_slicer_segment_editor_life_cycle():
    funcs = {k: ast.unparse(v) for k, v in _functions(_tree("VoCoSegment")).items()}
    assert "installKeyboardShortcuts()" in funcs["enter"]
    for call in ("setActiveEffect(None)", "uninstallKeyboardShortcuts()", "removeViewObservations()"):
        assert call in funcs["exit"], call
    assert "setSegmentationNode(None)" in funcs["sceneClosing"]
    assert "effectRegistered(QString)" in funcs["setup"] and "updateEffectList()" in funcs["onEffectRegistered"]
    assert "AddNewNodeByClass" not in MODULE_FILES["VoCoSegment"].read_text(), "singleton editor node only"
    assert '"Segmentations"' in MODULE_FILES["VoCoSegment"].read_text()


@pytest.mark.parametrize("name", list(MODULES))
def test_self_tests_skip_properly_and_help_links_the_docs(name):
    text = MODULE_FILES[name].read_text(encoding="utf-8")
    assert "test skipped" not in text
    assert "helpText" in text and 'href="{DOCS}"' in text
