"""The .ui files load with Qt's own loader (PySide6 QUiLoader, offscreen) and give every widget the module code
expects, with the expected kind.

Stand-ins: the Slicer/CTK widget classes (qMRMLNodeComboBox, ctkCollapsibleButton, ...) exist only inside the
Slicer app, so plain Qt classes with the same names are registered with the loader here. This is the one place a
stand-in is used: it checks the Qt side of the .ui (structure, names, standard properties), not Slicer's widgets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
QtWidgets = pytest.importorskip("PySide6.QtWidgets")
QtCore = pytest.importorskip("PySide6.QtCore")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")

ROOT = Path(__file__).resolve().parent.parent
UIS = {name: ROOT / name / "Resources" / "UI" / f"{name}.ui" for name in ("VoCoSlicer", "VoCoSegment", "VoCoPretrain")}


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801 - must carry the Slicer class names
    pass


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801
    pass


class ctkPathLineEdit(QtWidgets.QLineEdit):  # noqa: N801
    pass


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    pass


class qMRMLSegmentEditorWidget(qMRMLWidget):  # noqa: N801
    pass


STAND_INS = (qMRMLWidget, ctkCollapsibleButton, ctkPathLineEdit, qMRMLNodeComboBox, qMRMLSegmentEditorWidget)


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def _load(app, path: Path):
    loader = QtUiTools.QUiLoader()
    for cls in STAND_INS:
        loader.registerCustomWidget(cls)
    f = QtCore.QFile(str(path))
    assert f.open(QtCore.QFile.ReadOnly)
    try:
        widget = loader.load(f)
    finally:
        f.close()
    assert widget is not None, loader.errorString()
    return widget


@pytest.mark.parametrize("name", list(UIS))
def test_ui_loads_and_has_every_widget_the_module_uses(app, name):
    widget = _load(app, UIS[name])
    assert type(widget).__name__ == "qMRMLWidget"
    code = (ROOT / name / f"{name}.py").read_text(encoding="utf-8")
    for attr in sorted(set(re.findall(r"self\.ui\.(\w+)", code))):
        child = widget.findChild(QtCore.QObject, attr)
        assert child is not None, f"{name}.ui has no widget {attr}"
        if attr.endswith("Button") and not attr.endswith("CollapsibleButton"):
            assert isinstance(child, QtWidgets.QAbstractButton), attr
        if attr.endswith("ComboBox"):
            assert isinstance(child, QtWidgets.QComboBox), attr
    # parameter names survive as dynamic properties (what parameterNodeWrapper.connectGui looks for)
    bound = {w.property("SlicerParameterName") for w in widget.findChildren(QtWidgets.QWidget)}
    assert bound - {None}, "no widget bound to a parameter"
    widget.deleteLater()


def test_segment_panel_defaults(app):
    w = _load(app, UIS["VoCoSegment"])
    assert w.findChild(QtWidgets.QSpinBox, "stepsSpinBox").value() == 200
    lr = w.findChild(QtWidgets.QDoubleSpinBox, "learningRateSpinBox")
    assert lr.decimals() == 6 and lr.value() == pytest.approx(1e-4)
    assert w.findChild(QtWidgets.QPlainTextEdit, "logTextEdit").isReadOnly()
    assert w.findChild(QtWidgets.QComboBox, "outputSegmentationSelector").property("SlicerParameterName") == \
        "outputSegmentation"
    w.deleteLater()
