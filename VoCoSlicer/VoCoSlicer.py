"""VoCoSlicer: set-up of the extension (environment check, dependency install) and the model manager.

Thin Slicer module. It also ships the shared packages of the extension: ``VoCoSlicerLib`` (Slicer glue, imported
by all three modules) and ``vocoslicer`` (the engine, run only in child processes: ``PythonSlicer -m vocoslicer``).
"""

import sys

from VoCoSlicerLib.compat import unsupported_message

if unsupported_message(sys.version_info):  # older Slicer: this message, not an error from newer code below
    try:
        import slicer

        slicer.util.errorDisplay(unsupported_message(sys.version_info), windowTitle="VoCoSlicer")
    finally:
        raise ImportError(unsupported_message(sys.version_info))

import pathlib

import ctk
import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from VoCoSlicerLib import deps, models_view, module_support, panels
from VoCoSlicerLib.job_driver import JobDriver
from VoCoSlicerLib.state import JobState

DOCS = "https://github.com/vocoslicer/VoCoSlicer#readme"
MIN_TORCH = ">=2.3"


class VoCoSlicer(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("VoCoSlicer")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["VoCoSlicer contributors"]
        self.parent.helpText = _("Set up VoCoSlicer: check PyTorch, CUDA and the GPU, install or repair the Python "
                                 "packages, and download, import or remove models. Use VoCo Segment to segment "
                                 "and finetune, VoCo Pretrain for self-supervised pre-training.") + \
            f' <a href="{DOCS}">' + _("Documentation") + "</a>"
        self.parent.acknowledgementText = _("VoCo (Wu et al.) and PUMIT (Luo et al.); built on MONAI and PyTorch.")


@parameterNodeWrapper
class VoCoSlicerParameterNode:
    """Set-up options."""

    forceReinstall: bool = False  # "Python for jobs" is an application setting (QSettings), not per scene


class VoCoSlicerWidget(module_support.PanelPlumbing, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: environment report, install/repair, model manager."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic, self._rows, self._listing = None, [], False

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/VoCoSlicer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = VoCoSlicerLogic()
        self.envDriver = JobDriver(_("Check environment"), on_finished=self._onEnvironment)
        self.modelsDriver = JobDriver(_("Models"), on_finished=self._onModelsJob)
        self.logView = module_support.LogFollower()
        self._tick = module_support.TimerTick(lambda text: slicer.util.errorDisplay(text, windowTitle="VoCoSlicer"))
        self.ui.logTextEdit.setMaximumBlockCount(2000)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._onTimer)
        table = self.ui.modelsTableWidget
        table.setHorizontalHeaderLabels(list(models_view.COLUMNS))
        table.setSelectionBehavior(qt.QAbstractItemView.SelectRows)
        table.setEditTriggers(qt.QAbstractItemView.NoEditTriggers)
        self.ui.environmentTableWidget.setHorizontalHeaderLabels([_("Item"), _("Value")])
        self.ui.pythonPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Executable
        self.ui.pythonPathLineEdit.currentPath = module_support.read_python(qt.QSettings())  # before connecting
        self.observeSceneClose(slicer.mrmlScene)
        self.ui.checkEnvironmentButton.connect("clicked(bool)", self.onCheckEnvironment)
        self.ui.installButton.connect("clicked(bool)", self.onInstall)
        self.ui.pythonPathLineEdit.connect("currentPathChanged(QString)", self.onPythonChanged)
        self.ui.pythonResetButton.connect("clicked(bool)", self.onPythonReset)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.removeModelButton.connect("clicked(bool)", self.onRemoveModel)
        self.ui.openCacheButton.connect("clicked(bool)", self.onOpenCache)
        self.initializeParameterNode()
        self.onRefreshModels()
        self._updateGUI()

    def cleanup(self):
        self.removeObservers()
        self._timer.stop()
        self.envDriver.cancel()
        self.modelsDriver.cancel()

    def _python(self):
        return module_support.job_python(qt.QSettings())

    def onPythonChanged(self, path):
        module_support.write_python(qt.QSettings(), path)

    def onPythonReset(self):  # the path field emits nothing for an empty text: clearing needs its own button
        module_support.write_python(qt.QSettings(), "")
        self.ui.pythonPathLineEdit.currentPath = ""

    # ------------------------------------------------------------------ environment
    def onCheckEnvironment(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to check the environment.")):
            self.envDriver.start([["env", "--json"]], run_dir=slicer.util.tempDirectory(), python=self._python())
            self._timer.start()
            self._updateGUI()

    def _onEnvironment(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.adviceLabel.text = _("The environment probe failed: ") + driver.state.message
            return
        report = deps.EnvReport.from_json(driver.json_output())  # runs in the timer tick: it reports errors once
        rows = report.rows()
        table = self.ui.environmentTableWidget
        table.setRowCount(len(rows))
        for i, (item, value) in enumerate(rows):
            table.setItem(i, 0, qt.QTableWidgetItem(item))
            table.setItem(i, 1, qt.QTableWidgetItem(value))
        table.resizeColumnsToContents()
        self.ui.adviceLabel.text = "\n".join(report.advice()) or _("Ready: PyTorch and all packages found.")

    def onInstall(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to install dependencies."), waitCursor=True):
            self.logic.installDependencies(self.resourcePath("requirements.txt"), self._parameterNode.forceReinstall)
            self.onCheckEnvironment()

    # ------------------------------------------------------------------ models
    def onRefreshModels(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to list models.")):
            self._startModelsJob(models_view.list_args())

    def _startModelsJob(self, args):
        """One model command; a listing keeps a run folder (its JSON is read back), others report events on
        stdout (download progress) and are followed by a fresh listing."""
        if self.modelsDriver.busy:
            raise RuntimeError(_("Another model operation is running."))
        self._listing = args == models_view.list_args()
        self.modelsDriver.start([args], run_dir=slicer.util.tempDirectory() if self._listing else None,
                                python=self._python())
        self._timer.start()
        self._updateGUI()

    def _selectedRow(self):
        row = self.ui.modelsTableWidget.currentRow()
        if row < 0 or row >= len(self._rows):
            raise ValueError(_("Select a model in the table first."))
        return self._rows[row]

    def onDownloadModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to download the model.")):
            self._startModelsJob(models_view.download_args(self._selectedRow()))

    def onImportModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model.")):
            path = qt.QFileDialog.getOpenFileName(
                slicer.util.mainWindow(), _("Import a model bundle or checkpoint"), "",
                _("Model bundles and checkpoints (*.zip *.pt *.pth *.safetensors model.json)"))
            if path:
                self._startModelsJob(models_view.import_args(path))

    def onRemoveModel(self):
        with slicer.util.tryWithErrorDisplay(_("Failed to remove the model.")):
            row = self._selectedRow()
            if not row.installed:
                raise ValueError(_("This model is not installed."))
            if slicer.util.confirmOkCancelDisplay(_("Delete {model} from this computer?").format(
                    model=f"{row.id} {row.version}")):
                self._startModelsJob(models_view.remove_args(row))

    def onOpenCache(self):
        folder = models_view.models_dir()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def _onModelsJob(self, driver):
        if driver.state.state is not JobState.DONE:
            self.ui.modelsStatusLabel.text = driver.state.message or driver.state.state.value
            return
        if not self._listing:
            qt.QTimer.singleShot(0, self.onRefreshModels)  # after this job's bookkeeping is over
            return
        self._rows = models_view.parse_catalog(driver.json_output())  # in the timer tick: errors reported once
        table = self.ui.modelsTableWidget
        table.setRowCount(len(self._rows))
        for i, row in enumerate(self._rows):
            for j, text in enumerate(row.cells()):
                item = qt.QTableWidgetItem(text)
                item.setToolTip(row.description or row.path)
                table.setItem(i, j, item)
        table.resizeColumnsToContents()
        self.ui.modelsStatusLabel.text = models_view.status_text(self._rows)

    # ------------------------------------------------------------------ polling
    def _onTimer(self):  # one report per tick, no re-entry while a dialog is open (module_support.TimerTick)
        self._tick([*[(d.state.action, d.tick) for d in (self.envDriver, self.modelsDriver) if d.busy],
                    (_("Panel update"), self._updateGUI)])
        if not (self.envDriver.busy or self.modelsDriver.busy):
            self._timer.stop()

    def _updateGUI(self):
        self.ui.checkEnvironmentButton.enabled = not self.envDriver.busy
        busy = self.modelsDriver.busy
        for button in (self.ui.refreshModelsButton, self.ui.downloadModelButton, self.ui.importModelButton,
                       self.ui.removeModelButton):
            button.enabled = not busy
        panels.show_progress(panels.job_widgets(self.modelsDriver), self.ui.modelsProgressBar, busy)
        if busy:
            self.ui.modelsStatusLabel.text = self.modelsDriver.state.view().progress_text
        self.ui.environmentProgressBar.visible = self.envDriver.busy
        self.ui.environmentProgressBar.maximum = 0
        self.logView.show(self.ui.logTextEdit, [("", self.envDriver.log), ("", self.modelsDriver.log)])


class VoCoSlicerLogic(ScriptedLoadableModuleLogic):
    """Dependency installation (needs the Slicer app: PyTorch extension, slicer.packaging dialogs)."""

    def getParameterNode(self):
        return VoCoSlicerParameterNode(super().getParameterNode())

    def installDependencies(self, requirementsPath, force=False):
        """PyTorch through the PyTorch extension (right CUDA build), then the pinned engine packages with pip.

        Slicer's own numpy and SimpleITK and the installed torch are frozen by a constraints file, so pip
        reports a conflict instead of replacing them. Skipped in testing mode (pip_ensure's default).
        """
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError(_("The PyTorch extension is missing: install 'PyTorch' from the Extensions Manager, "
                                 "restart Slicer and try again.")) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if force or not torchLogic.torchInstalled():
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=MIN_TORCH) is None:
                raise RuntimeError(_("PyTorch was not installed (cancelled or failed); see the PyTorch Utils "
                                     "module to choose a CUDA version."))
        constraints = deps.write_constraints(pathlib.Path(slicer.util.tempDirectory()) / "constraints.txt")
        if hasattr(slicer, "packaging"):  # Slicer >= 5.12
            reqs = slicer.packaging.load_requirements(requirementsPath)
            slicer.packaging.pip_ensure(reqs, constraints=constraints, requester="VoCoSlicer")
        else:
            missing = deps.requirement_lines(requirementsPath) if force else \
                deps.missing_requirements(deps.requirement_lines(requirementsPath))
            if missing and slicer.util.confirmOkCancelDisplay(
                    _("VoCoSlicer needs these Python packages:") + "\n" + "\n".join(missing)):
                slicer.util.pip_install(["-c", str(constraints), *missing])
                if slicer.util.confirmYesNoDisplay(_("Packages installed. Restart Slicer now to use them?")):
                    slicer.util.restart()


class VoCoSlicerTest(ScriptedLoadableModuleTest):
    """In-app test: environment probe and model catalog through real child processes (no installs)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_environment_and_catalog()

    def _wait(self, driver, timeout=300):
        self.assertTrue(module_support.wait_for(driver, slicer.app.processEvents, timeout), "job timed out")
        self.assertEqual(driver.state.state, JobState.DONE, driver.state.message)

    def test_environment_and_catalog(self):
        driver = JobDriver("test")
        driver.start([["env", "--json"]], run_dir=slicer.util.tempDirectory())
        self._wait(driver)
        report = deps.EnvReport.from_json(driver.json_output())
        self.assertTrue(report.python)
        driver.start([models_view.list_args()], run_dir=slicer.util.tempDirectory())
        self._wait(driver)
        self.assertTrue(models_view.parse_catalog(driver.json_output()), "empty model catalog")
        self.delayDisplay("Test passed")
